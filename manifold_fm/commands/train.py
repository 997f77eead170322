"""``manifold-fm train``: train a flow from a run config (toy manifolds, latent images), or the built-in default run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..progress import progress_option
from ..threads import threads_option


@click.command(context_settings={"show_default": True})
@click.option(
    "--config",
    "config",
    default=None,
    metavar="NAME_OR_PATH",
    help="Built-in config name (e.g. toy-sphere, manifold-latlon, image-builtin, default) or a YAML file with a "
    "top-level 'kind' (manifold (or toy), image or default). Without it: the built-in default run.",
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
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out from its latest checkpoint, with its own config.yaml unless --config is given "
    "(a finished run is left as it is; a folder with no run is an error).",
)
@click.option(
    "--checkpoint",
    "checkpoint",
    default=None,
    metavar="STEP|PATH",
    help="With --resume: continue from this kept checkpoint (a step, or a step_* folder) instead of the latest.",
)
@click.option(
    "--extend",
    is_flag=True,
    help="With --resume: train the run to a new train.steps (--steps N). A constant LR schedule extends cleanly; "
    "a cosine one needs --reschedule too.",
)
@click.option(
    "--reschedule",
    is_flag=True,
    help="With --extend on a cosine LR schedule: accept that every step after the checkpoint gets the schedule "
    "of the new length.",
)
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
@click.option(
    "--quick",
    is_flag=True,
    help="The default run shrunk to about a minute (fewer steps, a shorter finetune, fewer images and samples; "
    "folder runs/default-quick): the same table and pictures, a smoke run's numbers. --set still applies after it.",
)
@threads_option
@progress_option
def train(
    config: str | None,
    overrides: tuple[str, ...],
    out_dir: Path | None,
    resume: bool,
    checkpoint: str | None,
    extend: bool,
    reschedule: bool,
    overwrite: bool,
    path: str | None,
    steps: int | None,
    quick: bool,
    threads: int | None,
) -> None:
    """Train a flow. `kind: manifold` (or `toy`) configs train a small MLP on a manifold, on a built-in dataset (about
    a minute on CPU) or a file of points (data.file, split train/val/test; eval.val_every keeps the best weights by
    validation NLL), and write config.yaml, checkpoints/, metrics.jsonl, metrics.json and samples.png to the run
    folder, and print the metrics;
    `kind: image` configs train a SiT on latents; the default run trains both flows of the paper on the built-in
    images and compares them. --threads is a shortcut for --set train.threads=N (a config's train.threads applies
    without it). --resume continues the run in --out (with its own config.yaml when no --config is given); on a
    finished run it says so and changes nothing; --extend (with --steps N) trains a run to a new length."""
    from ..config import ConfigError
    from ..training.schema import DefaultRunConfig, FinetuneRunConfig, ImageRunConfig

    if overwrite and resume:
        from ..training.run_folder import OVERWRITE_AND_RESUME

        raise click.UsageError(OVERWRITE_AND_RESUME)
    if not resume and (extend or reschedule or checkpoint is not None):
        raise click.UsageError("--checkpoint, --extend and --reschedule continue a run: pass them with --resume")
    if reschedule and not extend:
        raise click.UsageError("--reschedule goes with --extend (it accepts the new schedule of an extended run)")
    # User errors (config, checkpoint, run folder, paths) become one line in the CLI group (manifold_fm/cli.py).
    extra = list(overrides)
    if quick:
        if config not in (None, "default"):
            raise click.UsageError("--quick shrinks the built-in default run: leave out --config")
        from ..training.default_run import QUICK_OVERRIDES

        extra = [*QUICK_OVERRIDES, *extra]
    if path is not None:
        extra.append(f"flow.path={path}")
    if steps is not None:
        extra.append(f"train.steps={steps}")
    if threads is not None:
        extra.append(f"train.threads={threads}")
    cfg = _run_config(config, extra, out_dir if resume else None)  # validated before --overwrite deletes anything
    from accelerate import PartialState

    from ..training.trainer import cpu_only

    main = PartialState(cpu=cpu_only(None)).is_main_process
    if resume and _nothing_to_resume(cfg, out_dir, checkpoint, extend, reschedule, main):
        return
    if isinstance(cfg, FinetuneRunConfig):
        raise ConfigError("kind: a 'finetune' run is trained by manifold-fm finetune-decoder, not train")
    metrics = None
    if isinstance(cfg, DefaultRunConfig):
        from ..training.default_run import run_default

        if checkpoint is not None:
            raise click.UsageError(
                "--checkpoint picks a checkpoint of one run; a default run's modes are image runs of their own: "
                "resume one with --out <run>/<mode> --resume --checkpoint STEP"
            )
        result = run_default(cfg, out_dir=out_dir, resume=resume, overwrite=overwrite, extend=extend)
    elif isinstance(cfg, ImageRunConfig):
        from ..training.image import train_image

        result = train_image(cfg, out_dir=out_dir, resume=resume, overwrite=overwrite, checkpoint=checkpoint)
    else:
        from ..training.toy import train_toy

        result = train_toy(cfg, out_dir=out_dir, resume=resume, overwrite=overwrite, checkpoint=checkpoint)
        metrics = result / "metrics.json"
    if main:  # once, however many processes train
        if metrics is not None:
            import json

            from ..training.toy import metrics_table

            click.echo(metrics_table(json.loads(metrics.read_text())))
        click.echo(f"run folder: {result}")


def _run_config(config: str | None, overrides: list[str], resume_out: Path | None) -> Any:
    """The run's config: ``--config`` (default: the built-in default run) with the overrides; with ``--resume`` and
    no ``--config``, the resumed run's own ``config.yaml`` (its recorded files resolved against its folder)."""
    from ..training.run_folder import resolve_recorded_paths, resume_config_source
    from ..training.schema import load_run_config

    own = resume_config_source(resume_out) if config is None and resume_out is not None else None
    if own is None:
        return load_run_config(config or "default", overrides)
    return resolve_recorded_paths(load_run_config(own, overrides), resume_out)  # type: ignore[arg-type]


def _nothing_to_resume(
    cfg: Any, out_dir: Path | None, checkpoint: str | None, extend: bool, reschedule: bool, main: bool
) -> bool:
    """``train --resume``: refuse what may not be resumed (no run, another kind, another length without
    ``--extend``: :func:`~manifold_fm.training.run_folder.check_resume`); True if the run is finished and nothing
    is to be done (said in one line)."""
    from ..training.run_folder import check_resume, default_out_dir

    out = out_dir if out_dir is not None else default_out_dir(cfg)
    status = check_resume(
        out,
        cfg.kind,
        cfg.train.steps,
        cfg.optim.schedule,
        extend=extend,
        reschedule=reschedule,
        rewind=checkpoint is not None,
    )
    if status.finished and checkpoint is None:
        if main:
            click.echo(status.finished_line())
        return True
    if cfg.kind == "finetune":
        raise click.UsageError(
            f"{out} holds a decoder finetune: continue it with manifold-fm finetune-decoder --out {out} --resume "
            "(with the options it was started with)"
        )
    if main and status.total is not None and status.total != cfg.train.steps:
        click.echo(f"extending {out} from {status.total} to {cfg.train.steps} steps", err=True)
    return False
