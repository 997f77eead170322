"""``manifold-fm compare``: a metric against training steps for several runs, and the steps each needs to reach a
threshold (the paper's "FID 30 in ~2.2x fewer steps")."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, metavar="[NAME=]RUN...")
@click.option(
    "--metric",
    default="fd_builtin_classifier",
    show_default=True,
    help="A metric the runs logged during training (train.eval_every): fd_builtin_classifier, fid, ...",
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="The value to reach (lower is better); default: the first run's final value.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write comparison.json and comparison.png here.",
)
def compare(runs: tuple[str, ...], metric: str, threshold: float | None, out_dir: Path | None) -> None:
    """Plot METRIC against steps for RUNS (run folders, optionally named NAME=RUN; the first is the reference) and
    report the steps each needs to reach the threshold and its speedup over the reference."""
    from ..atomic import write_json_atomic
    from ..eval.over_training import compare_runs, plot_comparison

    named: dict[str, Path] = {}
    for item in runs:
        name, sep, path = item.partition("=")
        folder = Path(path if sep else item)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder; pass run folders, as RUN or NAME=RUN")
        named[name if sep else folder.name] = folder
    result = compare_runs(named, metric, threshold)
    width = max(len(n) for n in named)
    click.echo(f"{'run':<{width}}  {'final':>10}  {'steps to ' + format(result['threshold'], '.4g'):>18}  speedup")
    for name, curve in result["curves"].items():
        steps, speed = result["steps_to_threshold"][name], result["speedup_over_reference"][name]
        steps_text = "never" if steps is None else f"{steps:.0f}"
        speed_text = "-" if speed is None else f"{speed:.2f}x"
        click.echo(f"{name:<{width}}  {curve[-1][1]:>10.4g}  {steps_text:>18}  {speed_text}")
    if out_dir is not None:
        write_json_atomic(out_dir / "comparison.json", {**result, "runs": {k: str(v) for k, v in named.items()}})
        plot_comparison(result, out_dir / "comparison.png")
        click.echo(f"written: {out_dir / 'comparison.json'}, {out_dir / 'comparison.png'}")
