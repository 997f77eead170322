"""``manifold-fm compare``: a metric against training steps for several runs, and the steps each needs to reach a
threshold (the paper's "FID 30 in ~2.2x fewer steps").

A default run's folder stands for its modes (named by mode), each curve ending with the final evaluation of the
run's ``results.json`` (the table's own value and sample count)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


def _runs(items: tuple[str, ...], metric: str) -> tuple[dict[str, Path], dict[str, tuple[int, float]]]:
    """``[NAME=]RUN`` arguments as named run folders (a default run: its modes, named by mode) and the final
    evaluations of ``metric`` that default runs record in their ``results.json`` (for a default run's folder or one
    of its mode folders)."""
    import json

    from ..training.runs import default_run_arms

    named: dict[str, Path] = {}
    finals: dict[str, tuple[int, float]] = {}
    for item in items:
        name, sep, path = item.partition("=")
        folder = Path(path if sep else item)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder; pass run folders, as RUN or NAME=RUN")
        arms = default_run_arms(folder)
        if arms is not None:  # a default run: each mode is a run
            members = [(f"{name}/{arm.name}" if sep else arm.name, arm) for arm in arms]
            results = folder / "results.json"
        else:
            members = [(name if sep else folder.name, folder)]
            results = folder.parent / "results.json"
        try:
            modes = json.loads(results.read_text())["modes"] if results.is_file() else {}
        except (ValueError, KeyError, TypeError):
            modes = {}
        for key, run in members:
            final = modes.get(run.name) if isinstance(modes, dict) else None
            if isinstance(final, dict) and isinstance(final.get(metric), (int, float)) and "steps" in final:
                finals[key] = (int(final["steps"]), float(final[metric]))
            named[key] = run
    return named, finals


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, metavar="[NAME=]RUN...")
@click.option(
    "--metric",
    default=None,
    help="A metric the runs logged during training: fd_builtin_classifier, fid, ... (image runs, train.eval_every), "
    "val_nll (manifold runs, eval.val_every). Default: val_nll when every run is a manifold run, else "
    "fd_builtin_classifier.",
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="The value to reach (lower is better); default: the first run's final value.",
)
@click.option(
    "--interpolate",
    is_flag=True,
    help="Interpolate the crossing linearly between evaluations (default: the first evaluation at or below the "
    "threshold, with the evaluation before it).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write comparison.json and comparison.png here.",
)
def compare(
    runs: tuple[str, ...], metric: str | None, threshold: float | None, interpolate: bool, out_dir: Path | None
) -> None:
    """Plot METRIC against steps for RUNS (run folders, optionally named NAME=RUN; the first is the reference; a
    default run's folder: its modes) and report the steps each needs to reach the threshold and its speedup over the
    reference."""
    from ..atomic import write_json_atomic
    from ..eval.over_training import compare_runs, plot_comparison

    if metric is None:
        from ..training.toy import is_manifold_run

        folders = [Path(item.partition("=")[2] or item) for item in runs]
        metric = "val_nll" if all(is_manifold_run(f) for f in folders) else "fd_builtin_classifier"
    named, finals = _runs(runs, metric)
    result: dict[str, Any] = compare_runs(named, metric, threshold, finals=finals, interpolate=interpolate)
    width = max(len(n) for n in named)
    head = "steps to " + format(result["threshold"], ".4g")
    click.echo(f"{'run':<{width}}  {'final':>10}  {head:>22}  speedup")
    for name, curve in result["curves"].items():
        steps, speed = result["steps_to_threshold"][name], result["speedup_over_reference"][name]
        if steps is None:
            steps_text = "never"
        elif interpolate:
            steps_text = f"{steps:.0f}"
        else:
            steps_text = f"{steps:.0f} (after {result['evaluated_before'][name]})"
        speed_text = "-" if speed is None else f"{speed:.2f}x"
        click.echo(f"{name:<{width}}  {curve[-1][1]:>10.4g}  {steps_text:>22}  {speed_text}")
    if not interpolate:
        click.echo("steps: the first evaluation at or below the threshold; the crossing lies after the one in brackets")
    if out_dir is not None:
        write_json_atomic(out_dir / "comparison.json", {**result, "runs": {k: str(v) for k, v in named.items()}})
        plot_comparison(result, out_dir / "comparison.png")
        click.echo(f"written: {out_dir / 'comparison.json'}, {out_dir / 'comparison.png'}")
