"""``manifold-fm train``: train a flow from a config (toy manifolds or latent images), or the built-in default run."""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from ..config import ConfigError, read_yaml, resolve_config


def _load_entry(module: str, attr: str, what: str):  # type: ignore[no-untyped-def]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise click.ClickException(f"{what} is not available in this installation ({module} is missing)") from None
        raise
    fn = getattr(mod, attr, None)
    if fn is None:
        raise click.ClickException(f"{what} is not available ({module}.{attr} is missing)")
    return fn


@click.command(context_settings={"show_default": True})
@click.option("--config", "config", default=None, metavar="NAME_OR_PATH",
              help="Built-in config name (e.g. toy-sphere, toy-torus, toy-hyperbolic) or a YAML file. "
                   "Without it: the built-in default image run.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set train.steps=200 (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder (default: runs/<name>-<path>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--path", "path", type=click.Choice(["geodesic", "linear"]), default=None,
              help="Shortcut for --set path=...: geodesic (on the manifold) or linear (ambient + projection).")
@click.option("--steps", type=click.IntRange(min=0), default=None, help="Shortcut for --set train.steps=N.")
def train(
    config: str | None,
    overrides: tuple[str, ...],
    out_dir: Path | None,
    resume: bool,
    path: str | None,
    steps: int | None,
) -> None:
    """Train a flow. `kind: toy` configs train a small MLP on a toy manifold in about a minute on CPU and write
    config.yaml, checkpoints/, metrics.json and samples.png to the run folder."""
    from ..manifolds import ManifoldError
    from ..training.checkpoint import CheckpointError

    extra = list(overrides)
    if path is not None:
        extra.append(f"path={path}")
    if steps is not None:
        extra.append(f"train.steps={steps}")
    try:
        if config is None:
            run_default = _load_entry("manifold_fm.training.default_run", "run_default", "the default run")
            result = run_default(out_dir, extra)
        else:
            kind = read_yaml(resolve_config(config)).get("kind")
            if kind == "toy":
                from ..training.toy import train_toy

                result = train_toy(config, extra, out_dir, resume)
            elif kind == "image":
                train_image = _load_entry("manifold_fm.training.image", "train_image", "image training")
                result = train_image(config, extra, out_dir, resume)
            else:
                raise click.ClickException(
                    f"config '{config}' has kind {kind!r}; expected 'toy' or 'image' as its top-level 'kind' key"
                )
    except (ConfigError, ManifoldError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as exc:
        raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    click.echo(f"run folder: {result}")
