"""``manifold-fm export``: a trained latent-image run as a self-describing folder that
``manifold_fm.from_pretrained`` loads (see :mod:`manifold_fm.pipeline`). A default run's folder (``manifold-fm
train`` with no config) is exported mode by mode, into ``OUT/<mode>``."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="The folder to write: config.json, model.safetensors, decoder.safetensors (if used), README.md (a default "
    "run: one such folder per mode, OUT/<mode>).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    default=False,
    help="Replace an earlier export in --out (a folder holding anything else is never overwritten).",
)
@click.option(
    "--ema/--no-ema",
    default=True,
    show_default=True,
    help="Export the EMA weights (--no-ema: the raw weights; the EMA file is not read).",
)
@click.option(
    "--checkpoint",
    "checkpoint",
    default=None,
    metavar="STEP|PATH",
    help="Export this kept checkpoint (a step, or a step_* folder) instead of the latest.",
)
def export(run: Path, out_dir: Path, overwrite: bool, ema: bool, checkpoint: str | None) -> None:
    """Export RUN (a `manifold-fm train` output folder or one of its checkpoints; a default run's folder: each of its
    modes) for sharing: load it with `manifold_fm.from_pretrained(OUT)`, or upload it with `push_to_hub`."""
    from ..errors import InputError
    from ..pipeline import export_run, read_record
    from ..training.runs import default_run_arms

    arms = default_run_arms(run)
    if arms is None:
        jobs = [(run, out_dir)]
    else:
        trained = [arm for arm in arms if (arm / "checkpoints").is_dir()]
        if not trained:
            raise InputError(
                f"{run} is a default run whose modes ({', '.join(a.name for a in arms)}) hold no checkpoint yet; "
                f"finish it with manifold-fm train --out {run} --resume"
            )
        jobs = [(arm, out_dir / arm.name) for arm in trained]
    # User errors (run, checkpoint, --out) become one line in the CLI group (manifold_fm/cli.py).
    for source, target in jobs:
        out = export_run(source, target, overwrite=overwrite, use_ema=ema, checkpoint=checkpoint)
        record = read_record(out)
        files = ", ".join(sorted(p.name for p in out.iterdir()))
        measured = ", ".join(record.get("metrics") or {}) or "none found"
        click.echo(f"exported {record['config'].get('name')} (step {record['step']}) to {out}: {files}")
        click.echo(f"metrics in the model card: {measured}")
