"""Run folders on disk: what a run folder holds, whether its run is finished, what ``manifold-fm train --resume``
may continue and ``--overwrite`` may replace, and how a run records the files it uses.

A run folder holds what one run wrote (``config.yaml``, ``checkpoints/``, logs, samples; a default run's folder also
holds one run folder per arm). ``--overwrite`` deletes such a folder, and only such a folder, once the new run's
config has been validated, so a typo in ``--out`` cannot delete anything else.

**Finished runs are never rewritten** (:func:`run_status`, :func:`check_resume`). A run is finished when its final
record is there: an image run's checkpoint at ``train.steps``; a manifold (toy) run's ``metrics.json``; a decoder
finetune's checkpoint at ``train.steps`` and ``decoder.safetensors``; a default run's ``results.json`` (for the
``train.steps`` of its ``config.yaml``). ``train --resume`` on a finished run says so in one line and changes
nothing. Its length is part of the run: ``--resume`` with another ``train.steps`` is refused unless ``--extend``
asks for it; a constant learning-rate schedule extends cleanly (the longer run equals one trained for the new length
from the start), while a cosine schedule is a function of ``train.steps``, so extending it changes the learning rate
of every step after the checkpoint (it jumps up and decays to the floor at the new end): that also needs
``--reschedule``. ``--resume`` into a folder that holds no run is an error.

Files a run uses (the finetuned decoder, ``tokenizer.decoder_state``) are recorded in its ``config.yaml`` and
checkpoints relative to the run folder when they were given relative, and resolved against the run folder when the
run is loaded: a run folder moved or renamed together with its files (a default run with its
``spherical_decoder.safetensors``) still loads. Absolute paths are recorded as given.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError
from .checkpoint import checkpoint_step, latest_checkpoint
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


#: The run kinds whose final record is ``metrics.json`` (manifold runs; ``toy`` is their older name).
_METRICS_KINDS = ("toy", "manifold")


def _read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _checkpoint_steps(ckpt: Path | None) -> tuple[int | None, int | None]:
    """``(step, train_steps)`` of a checkpoint folder (``train_steps`` from its ``meta.json``, ``None`` if absent)."""
    if ckpt is None:
        return None, None
    meta = _read_json(ckpt / "meta.json") or {}
    total = meta.get("train_steps", (meta.get("config") or {}).get("train", {}).get("steps"))
    return checkpoint_step(ckpt), None if total is None else int(total)


@dataclass(frozen=True)
class RunStatus:
    """What a run folder holds (see the module docstring).

    Attributes:
        folder: the run folder.
        kind: its config's ``kind`` (``image`` for a folder with checkpoints but no ``config.yaml``).
        step: its latest checkpoint's step (a default run: the least over its modes; ``None``: none yet).
        total: the ``train.steps`` it is set for (``None``: unknown).
        finished: its final record is there.
        record: that record, or what it would be (for messages).
        schedule: its ``optim.schedule`` (``None``: unknown).
    """

    folder: Path
    kind: str
    step: int | None
    total: int | None
    finished: bool
    record: str
    schedule: str | None = None

    def finished_line(self) -> str:
        """The one line ``train --resume`` prints for a finished run."""
        what = {"default": "default run", "finetune": "decoder finetune"}.get(self.kind, f"{self.kind} run")
        steps = "" if self.total is None else f" ({self.total} steps)"
        return (
            f"{self.folder} holds a finished {what}{steps}, recorded in {self.record}; nothing to do (train it "
            "longer with --resume --extend --steps N, or start again with --overwrite)"
        )


def run_status(folder: str | Path) -> RunStatus | None:
    """The :class:`RunStatus` of ``folder``; ``None`` if it holds no run (no run ``config.yaml``, no checkpoint)."""
    folder = Path(folder)
    config = _read_yaml(folder / "config.yaml") or {}
    kind = config.get("kind") if config.get("kind") in (*KINDS, *_METRICS_KINDS) else None
    latest = latest_checkpoint(folder / "checkpoints")
    if kind is None and latest is None:
        return None
    step, recorded_total = _checkpoint_steps(latest)
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    total = train.get("steps", recorded_total)
    total = None if total is None else int(total)
    optim = config.get("optim") if isinstance(config.get("optim"), dict) else {}
    schedule = optim.get("schedule", "constant") if config else None
    kind = kind or "image"
    if kind == "default":
        modes = [str(m) for m in config.get("modes") or ["spherical", "linear"]]
        mode_steps = [_checkpoint_steps(latest_checkpoint(folder / m / "checkpoints"))[0] for m in modes]
        step = None if any(s is None for s in mode_steps) else min(mode_steps)  # type: ignore[type-var]
        results = _read_json(folder / "results.json")
        done = results is not None and (results.get("config") or {}).get("train", {}).get("steps") == total
        return RunStatus(folder, kind, step, total, done, "results.json", schedule)
    if kind in _METRICS_KINDS:
        metrics = _read_json(folder / "metrics.json")
        done = metrics is not None and metrics.get("train_steps", total) == total
        return RunStatus(folder, kind, step, total, done, "metrics.json", schedule)
    done = step is not None and step == total
    record = "checkpoints/" + (latest.name if latest is not None else f"step_{total or 0:08d}")
    if kind == "finetune":
        done = done and (folder / "decoder.safetensors").is_file()
        record = "decoder.safetensors"
    return RunStatus(folder, kind, step, total, done, record, schedule)


def check_resume(
    folder: str | Path,
    kind: str,
    steps: int,
    schedule: str,
    *,
    extend: bool = False,
    reschedule: bool = False,
    rewind: bool = False,
) -> RunStatus:
    """What ``train --resume`` may do with the run in ``folder``, for a run config of ``kind`` set for ``steps`` with
    the learning-rate ``schedule``; returns its :class:`RunStatus` (``finished``: nothing to do, unless ``rewind``:
    an earlier ``--checkpoint`` was chosen).

    Raises:
        InputError: ``folder`` holds no run, or a run of another kind; ``steps`` differs from the run's length
            without ``extend``; a cosine schedule would change without ``reschedule``; ``steps`` is below the
            latest checkpoint's step.
    """
    folder = Path(folder)
    status = run_status(folder)
    if status is None:
        raise InputError(
            f"--resume: {folder} holds no run to continue (no config.yaml or checkpoints/); run without --resume "
            "to start one"
        )
    same = {status.kind, kind} <= set(_METRICS_KINDS) or status.kind == kind
    if not same:
        raise InputError(
            f"--resume: {folder} holds a {status.kind} run, not a {kind} run; resume it with its own config "
            f"(omit --config: {folder / 'config.yaml'} is used)"
        )
    if status.total is None or steps == status.total:
        return status
    if not extend:
        raise InputError(
            f"--resume: {folder} was set for {status.total} steps, not {steps}; pass --extend to change its length "
            f"(or resume with --steps {status.total})"
        )
    if status.step is not None and steps < status.step and not rewind:
        raise InputError(
            f"--extend: {folder} is at step {status.step}, beyond {steps}; pass at least --steps {status.step}"
        )
    if schedule == "cosine" and not reschedule:
        raise InputError(
            f"--extend: {folder} decays its learning rate on a cosine over train.steps = {status.total}; at {steps} "
            "steps every later step gets another rate (it jumps up, then decays to the floor at the new end): pass "
            "--reschedule as well to accept that, or set optim.schedule=constant for runs to extend"
        )
    return RunStatus(status.folder, status.kind, status.step, status.total, False, status.record, status.schedule)


def default_out_dir(cfg: Any) -> Path:
    """Where a run goes without ``--out``: ``runs/<name>``; manifold (toy) runs ``runs/<name>-<flow.path>``."""
    if getattr(cfg, "kind", None) in _METRICS_KINDS:
        return Path("runs") / f"{cfg.name}-{cfg.flow.path}"
    return Path("runs") / cfg.name


def resume_config_source(out: str | Path) -> Path | None:
    """The config ``train --resume`` continues the run in ``out`` with when no ``--config`` is given: the run's own
    ``config.yaml`` (``None`` if it has none)."""
    path = Path(out) / "config.yaml"
    return path if path.is_file() else None


def resolve_recorded_paths(cfg: Any, run_dir: str | Path) -> Any:
    """``cfg`` (a run config read from the run's own ``config.yaml``) with the files it records relative to the run
    folder (``tokenizer.decoder_state``) resolved against ``run_dir`` (see :func:`resolve_recorded_path`)."""
    tok = getattr(cfg, "tokenizer", None)
    state = getattr(tok, "decoder_state", None)
    if state is None:
        return cfg
    resolved = resolve_recorded_path(Path(state), run_dir)
    return cfg.model_copy(update={"tokenizer": tok.model_copy(update={"decoder_state": resolved})})


def sample_folder_guard(out: str | Path, request: Mapping[str, Any], *, overwrite: bool = False) -> str:
    """What ``sample --out`` may do with ``out``: ``"new"`` (absent or empty), ``"resume"`` (it holds the partial
    shards of this same ``request``: a stopped ``sample`` continues), ``"replace"`` (it holds samples and
    ``overwrite`` asks to replace them: :func:`clear_sample_folder` first).

    Raises:
        InputError: it holds samples (finished, or shards of another request) and ``overwrite`` is not set; it holds
            files that are not samples; it is a file.
    """
    out = Path(out)
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise InputError(f"--out {out} is a file; choose a folder for the samples")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return "new"
    shards = out / "shards" / "request.json"
    finished = (out / "sample_info.json").is_file()
    if shards.is_file() and not finished:
        wanted = json.loads(json.dumps(dict(request), default=str))
        if _read_json(shards) == wanted:
            return "resume"
        if not overwrite:
            raise InputError(
                f"--out {out} holds samples of another request (see shards/request.json); pass --overwrite to "
                "replace them or choose another --out"
            )
        return "replace"
    if not (finished or shards.is_file()) or entries - _SAMPLE_FILES:
        raise InputError(f"--out {out} holds files that are not samples of manifold-fm sample; choose another --out")
    if not overwrite:
        raise InputError(f"--out {out} already holds samples (sample_info.json); pass --overwrite to replace them")
    return "replace"


#: What ``manifold-fm sample`` writes into its ``--out`` folder.
_SAMPLE_FILES = {"samples.npz", "grid.png", "sample_info.json", "shards", "metrics.json"}


def clear_sample_folder(out: str | Path) -> None:
    """Delete what ``manifold-fm sample`` wrote into ``out`` (for ``--overwrite``; anything else stays)."""
    out = Path(out)
    for name in _SAMPLE_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


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
    "RunStatus",
    "check_resume",
    "clear_sample_folder",
    "default_out_dir",
    "holds_run",
    "recorded_path",
    "replace_run_folder",
    "resolve_recorded_path",
    "resolve_recorded_paths",
    "resume_config_source",
    "run_status",
    "sample_folder_guard",
]
