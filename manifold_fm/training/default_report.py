"""The default run's report: its summary table (Markdown), what each column means, and the result files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..threads import threads_text
from .schema import FLOW_PRESETS

#: What the table's columns and reference rows mean (printed and written under the table).
LEGEND = """\
- FD-builtin-classifier (lower is better): the Fréchet distance between the features of the samples and of held-out
  real images, in the built-in classifier shipped with the package (trained on rendered images of its own; not
  FID: no Inception network here).
- classifier accuracy (higher is better): how often that classifier names the class each sample was generated for
  (12 classes: chance is 0.083).
- on-sphere error (max): the largest | |z| / sqrt(d) - 1 | over the generated latent tokens z (d channels), i.e. the
  largest distance of a token from the sphere of radius sqrt(d), relative to the radius. Spherical modes sample on
  the spheres, so theirs is float rounding. In parentheses for modes that do not project onto the spheres (linear,
  shell): their tokens are not meant to lie on them, and the value is shown for reference only.
- train wall time: the mode's training, with its evaluations during training (with parallel: true the modes
  train at the same time, in parallel processes).
- sampling s/image: wall time to sample and decode one image, per image of the final evaluation.
- reference rows: held-out real images (the floor a generator can reach) and held-out images encoded and decoded
  through each decoder (what a perfect generator could reach through that decoder)."""


def format_table(results: dict[str, Any]) -> str:
    """The summary table (Markdown) of a default run's ``results``: one row per mode, then the reference rows."""
    lines = [
        "| run | FD-builtin-classifier ↓ | classifier accuracy ↑ | on-sphere error (max) | train wall time | "
        "sampling s/image |",
        "|---|---|---|---|---|---|",
    ]
    for mode, r in results["modes"].items():
        spherical = FLOW_PRESETS.get(mode, {}).get("latent") == "spherical"
        ose = f"{r['on_sphere_error_max']:.1e}" if spherical else f"({r['on_sphere_error_max']:.2f})"
        lines.append(
            f"| {mode} | {r['fd_builtin_classifier']:.3f} | {r['classifier_accuracy']:.3f} | {ose} | "
            f"{r['train_s']:.0f} s | {r['sample_s_per_image'] * 1e3:.1f} ms |"
        )
    for name, r in results["references"].items():
        acc = f"{r['classifier_accuracy']:.3f}" if "classifier_accuracy" in r else "-"
        lines.append(f"| {name} | {r['fd_builtin_classifier']:.3f} | {acc} | - | - | - |")
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: Path, threads: int) -> str:
    """Write ``results.json`` and ``results.md`` (the table, what its columns mean and the total wall time) into
    ``out``; returns the table with its legend."""
    report = format_table(results) + "\n\n" + LEGEND
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, default=str))
    write_text_atomic(
        out / "results.md", report + f"\n\nTotal wall time: {results['total_s']:.0f} s ({threads_text(threads)}).\n"
    )
    return report


__all__ = ["LEGEND", "format_table", "write_report"]
