"""Figures of runs: data against model samples on a manifold, and metrics against training steps (PNG, atomic)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ..atomic import atomic_path
from ..manifolds import Manifold


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it to ``path`` atomically (format from the suffix) and close it; returns ``path``."""
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_samples(data: Tensor, samples: Tensor, manifold: Manifold, path: str | Path, title: str = "") -> Path:
    """Scatter data and model samples side by side in the manifold's plot chart (:meth:`Manifold.chart2d
    <manifold_fm.manifolds.Manifold.chart2d>`: longitude/latitude on ``S^2``, angles on the torus, the Poincare
    disk with its boundary)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharex=True, sharey=True)
    for ax, pts, label in zip(axes, (data, samples), ("data", "model samples"), strict=True):
        chart = manifold.chart2d(pts)
        ax.scatter(chart.u.numpy(), chart.v.numpy(), s=2, alpha=0.5)
        ax.set_title(label)
        ax.set_xlabel(chart.xlabel)
        ax.set_ylabel(chart.ylabel)
        if chart.disk_radius is not None:
            ax.add_patch(plt.Circle((0, 0), chart.disk_radius, fill=False, color="k", lw=0.8))
            ax.set_aspect("equal")
    fig.suptitle(title)
    return save_figure(fig, path, dpi=100)


def plot_points(points: Tensor, manifold: Manifold, path: str | Path, title: str = "") -> Path:
    """Scatter points in the manifold's chart, as a map: ``S^2`` as an equirectangular world map (longitude and
    latitude in degrees), the torus as its square of angles, hyperbolic space as the Poincare disk."""
    import math

    plt = pyplot()
    chart = manifold.chart2d(points)
    u, v = chart.u.numpy(), chart.v.numpy()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    if chart.xlabel == "longitude":
        ax.scatter(u * 180 / math.pi, v * 180 / math.pi, s=2, alpha=0.5)
        ax.set_xlim(-180, 180)
        ax.set_ylim(-90, 90)
        ax.set_xticks(range(-180, 181, 60))
        ax.set_yticks(range(-90, 91, 30))
        ax.grid(alpha=0.3)
        ax.set_aspect("equal")
        ax.set_xlabel("longitude (degrees)")
        ax.set_ylabel("latitude (degrees)")
    else:
        ax.scatter(u, v, s=2, alpha=0.5)
        ax.set_xlabel(chart.xlabel)
        ax.set_ylabel(chart.ylabel)
        if manifold.periodic:
            ax.set_xlim(-math.pi, math.pi)
            ax.set_ylim(-math.pi, math.pi)
            ax.set_aspect("equal")
        if chart.disk_radius is not None:
            r = chart.disk_radius
            ax.add_patch(plt.Circle((0, 0), r, fill=False, color="k", lw=0.8))
            ax.set_xlim(-1.05 * r, 1.05 * r)
            ax.set_ylim(-1.05 * r, 1.05 * r)
            ax.set_aspect("equal")
    ax.set_title(title)
    return save_figure(fig, path, dpi=100)


def plot_over_steps(
    history: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    panels: Sequence[tuple[str, str]] = (
        ("fd_builtin_classifier", "FD-builtin-classifier (lower is better)"),
        ("classifier_accuracy", "classifier accuracy"),
        ("loss", "flow-matching loss (not comparable across modes)"),
    ),
) -> Path:
    """One panel per ``(metric, title)``, one line per run of ``history`` (its ``metrics.jsonl`` records), against
    the training step."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.6))
    for name, records in history.items():
        for ax, (key, _) in zip(axes, panels, strict=True):
            rows = [r for r in records if key in r]
            style = "-" if key == "loss" else "o-"
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=name)
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


__all__ = ["plot_over_steps", "plot_points", "plot_samples", "pyplot", "save_figure"]
