"""Run folders on disk: what ``manifold-fm train --overwrite`` may replace, and how a run records the files it uses.

A run folder holds what one run wrote (``config.yaml``, ``checkpoints/``, logs, samples; a default run's folder also
holds one run folder per arm). ``--overwrite`` deletes such a folder, and only such a folder, once the new run's
config has been validated, so a typo in ``--out`` cannot delete anything else.

Files a run uses (the finetuned decoder, ``tokenizer.decoder_state``) are recorded in its ``config.yaml`` and
checkpoints relative to the run folder when they were given relative, and resolved against the run folder when the
run is loaded: a run folder moved or renamed together with its files (a default run with its
``spherical_decoder.safetensors``) still loads. Absolute paths are recorded as given.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from ..errors import InputError
from .checkpoint import latest_checkpoint
from .schema import KINDS

#: The one line for ``--overwrite`` with ``--resume``.
OVERWRITE_AND_RESUME = (
    "--overwrite and --resume exclude each other: --resume continues the run in --out, --overwrite replaces it"
)


def _run_kind(folder: Path) -> str | None:
    """The ``kind`` of the run config in ``folder/config.yaml`` (``None``: none there, or not a run config)."""
    try:
        data = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if kind in KINDS else None


def holds_run(folder: str | Path) -> bool:
    """Whether ``folder`` holds a run: a run config (``config.yaml`` with a run ``kind``) or a checkpoint."""
    folder = Path(folder)
    return _run_kind(folder) is not None or latest_checkpoint(folder / "checkpoints") is not None


def replace_run_folder(out: str | Path, *, resume: bool = False, delete: bool = True) -> None:
    """Delete the run folder ``out`` for ``train --overwrite`` (nothing to do if it does not exist); with
    ``delete=False`` only check (what every process of a multi-process run does before the main one deletes).

    Raises:
        InputError: ``resume`` too; ``out`` holds files but no run; ``out`` is the working directory or above it.
    """
    if resume:
        raise InputError(OVERWRITE_AND_RESUME)
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"--out {out} is a file, not a run folder; choose another --out")
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise InputError(f"--overwrite would delete {out}, which holds the working directory; choose another --out")
    if any(out.iterdir()) and not holds_run(out):
        raise InputError(
            f"--overwrite replaces run folders only, and {out} holds no run (no config.yaml or checkpoints/); "
            "choose another --out"
        )
    if delete:
        shutil.rmtree(out)


def recorded_path(path: Path | None, run_dir: str | Path) -> Path | None:
    """How a run records a file it uses: a relative ``path`` (to the working directory) becomes relative to the run
    folder ``run_dir``; an absolute one is kept."""
    if path is None or path.is_absolute():
        return path
    return Path(os.path.relpath(Path(path).resolve(), Path(run_dir).resolve()))


def resolve_recorded_path(path: Path | None, run_dir: str | Path) -> Path | None:
    """The file a run's record names: a relative ``path`` is relative to the run folder ``run_dir``. (Runs written
    before paths were recorded this way hold paths relative to the working directory: such a path is used when no
    file exists relative to the run folder but one does relative to the working directory.)"""
    if path is None or path.is_absolute():
        return path
    in_run = Path(run_dir) / path
    return path if not in_run.exists() and path.exists() else in_run


__all__ = [
    "OVERWRITE_AND_RESUME",
    "holds_run",
    "recorded_path",
    "replace_run_folder",
    "resolve_recorded_path",
]
