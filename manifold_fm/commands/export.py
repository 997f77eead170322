"""``manifold-fm export``: a trained latent-image run as a self-describing folder that
``manifold_fm.from_pretrained`` loads (see :mod:`manifold_fm.pipeline`)."""

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
    help="The folder to write: config.json, model.safetensors, decoder.safetensors (if used), README.md.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    default=False,
    help="Replace an earlier export in --out (a folder holding anything else is never overwritten).",
)
@click.option("--ema/--no-ema", default=True, show_default=True, help="Export the EMA weights.")
def export(run: Path, out_dir: Path, overwrite: bool, ema: bool) -> None:
    """Export RUN (a `manifold-fm train` output folder or one of its checkpoints) for sharing: load it with
    `manifold_fm.from_pretrained(OUT)`, or upload it with `push_to_hub`."""
    from ..config import ConfigError
    from ..pipeline import export_run, read_record
    from ..training.checkpoint import CheckpointError

    try:
        out = export_run(run, out_dir, overwrite=overwrite, use_ema=ema)
    except (ConfigError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    record = read_record(out)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    measured = ", ".join(record.get("metrics") or {}) or "none found"
    click.echo(f"exported {record['config'].get('name')} (step {record['step']}) to {out}: {files}")
    click.echo(f"metrics in the model card: {measured}")
