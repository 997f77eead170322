"""A metric against training steps, for several runs: the curves, the steps each run needs to reach a threshold, and
their ratio (the paper's "FID 30 in ~2.2x fewer steps").

Runs log evaluations during training to ``metrics.jsonl`` (``train.eval_every``: FD-builtin-classifier on the
built-in data, FID with local Inception weights otherwise). :func:`steps_to_threshold` reads the first evaluation at
or below a threshold (lower is better; ``None`` if the run never gets there): the crossing lies between it and the
evaluation before, so the evaluations must be dense enough for the answer (a straight-line interpolation between
them is available, ``interpolate=True``, but guesses). A run's final evaluation, when it is recorded elsewhere than
``metrics.jsonl`` (a default run's ``results.json``), is added as the curve's last point (``finals``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..records import read_jsonl


def metric_curve(run: str | Path, metric: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every evaluation of ``metric`` a run logged, in step order (the last record of a step
    wins)."""
    values: dict[int, float] = {}
    for record in read_jsonl(Path(run) / "metrics.jsonl"):
        value = record.get(metric)
        if isinstance(value, (int, float)):
            values[int(record["step"])] = float(value)
    return sorted(values.items())


def steps_to_threshold(curve: Sequence[tuple[int, float]], threshold: float, interpolate: bool = False) -> float | None:
    """The step at which a decreasing metric first reaches ``threshold``: the first evaluation at or below it
    (``interpolate``: linear interpolation between the two evaluations around the crossing, the first evaluation's
    step if it is already there); ``None`` if never."""
    previous: tuple[int, float] | None = None
    for step, value in curve:
        if value <= threshold:
            if not interpolate or previous is None or previous[1] == value:
                return float(step)
            s0, v0 = previous
            return s0 + (v0 - threshold) / (v0 - value) * (step - s0)
        previous = (step, value)
    return None


def compare_runs(
    runs: Mapping[str, str | Path],
    metric: str,
    threshold: float | None = None,
    *,
    finals: Mapping[str, tuple[int, float]] | None = None,
    interpolate: bool = False,
) -> dict[str, Any]:
    """Curves of ``metric`` for named runs (``finals``: a run's final ``(step, value)`` recorded outside its
    ``metrics.jsonl``, replacing any logged value of that step), the steps each needs to reach ``threshold``
    (default: the first run's final value; see :func:`steps_to_threshold`), the evaluation before that step
    (``evaluated_before``: the crossing lies after it; 0 if reached at the first evaluation) and each run's
    ``speedup`` over the first (the first run's steps over its own: 2.2 means it gets there in 2.2x fewer steps)."""
    curves = {name: metric_curve(path, metric) for name, path in runs.items()}
    for name, (step, value) in (finals or {}).items():
        curves[name] = sorted({**dict(curves[name]), int(step): float(value)}.items())
    empty = [name for name, curve in curves.items() if not curve]
    if empty:
        raise InputError(
            f"run(s) {', '.join(empty)} logged no {metric!r}; train with train.eval_every set (image runs) or "
            "eval.val_every set (manifold runs, which log val_nll: --metric val_nll)"
        )
    first = next(iter(curves))
    if threshold is None:
        threshold = curves[first][-1][1]
    steps = {name: steps_to_threshold(curve, threshold, interpolate) for name, curve in curves.items()}
    before = {
        name: max((s for s, _ in curves[name] if s < (steps[name] or 0)), default=0)
        if steps[name] is not None
        else None
        for name in curves
    }
    base = steps[first]
    speedup = {name: (base / s if (s and base is not None) else None) for name, s in steps.items()}
    return {
        "metric": metric,
        "threshold": threshold,
        "reference_run": first,
        "curves": curves,
        "steps_to_threshold": steps,
        "evaluated_before": before,
        "interpolated": interpolate,
        "speedup_over_reference": speedup,
    }


def plot_comparison(result: Mapping[str, Any], path: str | Path) -> Path:
    """The curves of :func:`compare_runs` with the threshold and each run's crossing marked."""
    from .plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, curve in result["curves"].items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], "o-", label=name, ms=3)
        crossing = result["steps_to_threshold"][name]
        if crossing is not None:
            ax.axvline(crossing, ls=":", lw=0.8, color=ax.lines[-1].get_color())
    ax.axhline(result["threshold"], color="k", lw=0.8, ls="--", label=f"threshold {result['threshold']:.3g}")
    ax.set_xlabel("training step")
    ax.set_ylabel(result["metric"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


__all__ = ["compare_runs", "metric_curve", "plot_comparison", "steps_to_threshold"]
