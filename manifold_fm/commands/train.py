"""``manifold-fm train``: train a flow from a run config (toy manifolds, latent images), or the built-in default run."""

from __future__ import annotations

from pathlib import Path

import click

from ..progress import progress_option
from ..threads import threads_option


@click.command(context_settings={"show_default": True})
@click.option(
    "--config",
    "config",
    default=None,
    metavar="NAME_OR_PATH",
    help="Built-in config name (e.g. toy-sphere, image-builtin, default) or a YAML file with a top-level "
    "'kind' (toy, image or default). Without it: the built-in default run.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. --set train.steps=200 (repeatable).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run folder (default: runs/<name>, toy runs runs/<name>-<path>).",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the run in --out: it is deleted once the new config has been validated (not with --resume).",
)
@click.option(
    "--path",
    "path",
    type=click.Choice(["geodesic", "linear"]),
    default=None,
    help="Shortcut for --set flow.path=...: geodesic (on the manifold) or linear (the straight line; "
    "for latent images the vanilla baseline).",
)
@click.option("--steps", type=click.IntRange(min=0), default=None, help="Shortcut for --set train.steps=N.")
@threads_option
@progress_option
def train(
    config: str | None,
    overrides: tuple[str, ...],
    out_dir: Path | None,
    resume: bool,
    overwrite: bool,
    path: str | None,
    steps: int | None,
    threads: int | None,
) -> None:
    """Train a flow. `kind: toy` configs train a small MLP on a toy manifold in about a minute on CPU and write
    config.yaml, checkpoints/, metrics.jsonl, metrics.json and samples.png to the run folder, and print the metrics;
    `kind: image` configs train a SiT on latents; the default run trains both flows of the paper on the built-in
    images and compares them. --threads is a shortcut for --set train.threads=N (a config's train.threads applies
    without it)."""
    from ..config import ConfigError
    from ..training.schema import DefaultRunConfig, FinetuneRunConfig, ImageRunConfig, load_run_config

    if overwrite and resume:
        from ..training.run_folder import OVERWRITE_AND_RESUME

        raise click.UsageError(OVERWRITE_AND_RESUME)
    # User errors (config, checkpoint, run folder, paths) become one line in the CLI group (manifold_fm/cli.py).
    extra = list(overrides)
    if path is not None:
        extra.append(f"flow.path={path}")
    if steps is not None:
        extra.append(f"train.steps={steps}")
    if threads is not None:
        extra.append(f"train.threads={threads}")
    cfg = load_run_config(config or "default", extra)  # validated before --overwrite deletes anything
    if isinstance(cfg, FinetuneRunConfig):
        raise ConfigError("kind: a 'finetune' run is trained by manifold-fm finetune-decoder, not train")
    metrics = None
    if isinstance(cfg, DefaultRunConfig):
        from ..training.default_run import run_default

        result = run_default(cfg, out_dir=out_dir, resume=resume, overwrite=overwrite)
    elif isinstance(cfg, ImageRunConfig):
        from ..training.image import train_image

        result = train_image(cfg, out_dir=out_dir, resume=resume, overwrite=overwrite)
    else:
        from ..training.toy import train_toy

        result = train_toy(cfg, out_dir=out_dir, resume=resume, overwrite=overwrite)
        metrics = result / "metrics.json"
    from accelerate import PartialState

    from ..training.trainer import cpu_only

    if PartialState(cpu=cpu_only(None)).is_main_process:  # once, however many processes train
        if metrics is not None:
            import json

            from ..training.toy import metrics_table

            click.echo(metrics_table(json.loads(metrics.read_text())))
        click.echo(f"run folder: {result}")
