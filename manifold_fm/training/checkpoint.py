"""Atomic, resumable checkpoints: weights in safetensors, everything else a training loop needs to continue exactly.

Layout of a run's checkpoint folder::

    checkpoints/
      step_00001000/           one complete checkpoint (written as step_00001000.tmp-<pid>/, then renamed)
        model.safetensors      model weights
        ema.safetensors        EMA weights (optional)
        state.pt               optimizer / scheduler / RNG / data-position state (torch.save)
        meta.json              step, config digest, wall time, free-form metadata
      latest                   text file naming the newest complete checkpoint (replaced atomically)

A crash at any moment leaves either the previous ``latest`` or the new one, never a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable."""


@dataclass
class Checkpoint:
    """The contents of one checkpoint folder."""

    step: int
    model: dict[str, Tensor]
    ema: dict[str, Tensor] | None = None
    state: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def rng_state() -> dict[str, Any]:
    """Every global RNG a training step may touch: Python, NumPy, torch CPU and (if present) CUDA."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - the global RNG is what we restore
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNGs captured by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _contiguous(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone detaches tied weights as well.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_checkpoint(
    root: str | Path,
    step: int,
    model: Mapping[str, Tensor],
    *,
    ema: Mapping[str, Tensor] | None = None,
    state: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    keep: int | None = None,
    keep_every: int | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and point ``root/latest`` at it.

    ``keep``: if given, delete all but the newest ``keep`` complete checkpoints afterwards, except those whose step
    is a multiple of ``keep_every`` (e.g. a checkpoint every epoch for crashes, every 10th kept for evaluations).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.tmp-*"):  # a write a killed process left half done (one writer: the main process)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    save_file(_contiguous(model), str(tmp / "model.safetensors"))
    _test_pause(tmp, step)
    if ema is not None:
        save_file(_contiguous(ema), str(tmp / "ema.safetensors"))
    torch.save(dict(state or {}), tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **dict(meta or {})}, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f"{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)
    if keep is not None and keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            if keep_every and int(old.name.split("_")[-1]) % keep_every == 0:
                continue
            shutil.rmtree(old, ignore_errors=True)
    return final


def _test_pause(tmp: Path, step: int) -> None:
    """Test-only: with ``MANIFOLD_FM_TEST_PAUSE_IN_CHECKPOINT=<file>:<step>`` set, the write of checkpoint ``<step>``
    announces itself half done by creating ``<file>`` and waits there, so a test can kill the process mid-write."""
    marker, _, at = os.environ.get("MANIFOLD_FM_TEST_PAUSE_IN_CHECKPOINT", "").rpartition(":")
    if marker and int(at) == step and not Path(marker).exists():
        Path(marker).write_text(str(tmp))
        time.sleep(600)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and ".tmp-" not in p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``root/latest`` names, or ``None`` if there is none yet."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if path.is_dir():
            return path
    found = list_checkpoints(root)
    return found[-1] if found else None


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint folder, from its name (``step_00001000`` -> 1000)."""
    return int(Path(path).name.split("_")[-1])


def kept_steps(root: str | Path) -> list[int]:
    """The steps of the complete checkpoints under ``root``, oldest first."""
    return [checkpoint_step(p) for p in list_checkpoints(root)]


def _steps_text(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if steps else "none"


def select_checkpoint(root: str | Path, choice: str | int | Path | None = None) -> Path | None:
    """The checkpoint ``choice`` names among a run's checkpoints (``root``: its ``checkpoints`` folder): ``None``
    the latest (``None`` if there is none yet); a step (an int, or a string of digits) that step's checkpoint under
    ``root``; a path a ``step_*`` folder (or a folder holding checkpoints: its latest). What ``--checkpoint STEP|PATH``
    of ``train --resume``, ``sample`` and ``export`` picks.

    Raises:
        CheckpointError: the step is not kept (the message lists the kept ones), or the path holds no checkpoint.
    """
    root = Path(root)
    if choice is None:
        return latest_checkpoint(root)
    text = str(choice).strip()
    if text.isdigit():
        step = int(text)
        path = root / f"step_{step:08d}"
        if not (path / "model.safetensors").is_file():
            raise CheckpointError(
                f"--checkpoint {step}: {root} keeps no checkpoint of step {step} (kept: "
                f"{_steps_text(kept_steps(root))})"
            )
        return path
    path = Path(text)
    if (path / "model.safetensors").is_file():
        return path
    inner = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = latest_checkpoint(inner) if inner.is_dir() else None
    if latest is None:
        raise CheckpointError(f"--checkpoint {path}: not a checkpoint folder (step_*/ with model.safetensors)")
    return latest


def _other_checkpoints(path: Path) -> str:
    """What to do instead of reading the checkpoint ``path``: the other checkpoints kept beside it, by step."""
    others = [s for s in kept_steps(path.parent) if s != checkpoint_step(path)] if path.name.startswith("step_") else []
    if not others:
        return f"no other checkpoint is kept in {path.parent}"
    return f"choose another with --checkpoint STEP (kept: {_steps_text(others)})"


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    model: bool = True,
    ema: bool = True,
    state: bool = True,
) -> Checkpoint:
    """Read a checkpoint folder (or a run's ``checkpoints`` root, taking its latest). ``model``, ``ema``, ``state``:
    which files to read (a file not read is never opened, so a damaged one does not matter: ``sample --no-ema``
    reads no EMA file); ``meta.json`` is always read.

    Raises:
        CheckpointError: no checkpoint there, or a file it reads is unreadable (the message names the file and the
            other checkpoints kept, if any, with ``--checkpoint``).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a run's checkpoints folder or a step_* folder")
    if not (path / "model.safetensors").is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path} holds no complete checkpoint (no step_*/model.safetensors)")
        path = latest

    def read(name: str, reader: Any) -> Any:
        try:
            return reader(path / name)
        except (OSError, ValueError, json.JSONDecodeError, RuntimeError, SafetensorError, EOFError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            hint = "; --no-ema reads the raw weights without it" if name == "ema.safetensors" else ""
            raise CheckpointError(
                f"checkpoint file {path / name} is unreadable ({reason}){hint}; {_other_checkpoints(path)}"
            ) from None

    meta = read("meta.json", lambda f: json.loads(f.read_text()))
    weights = read("model.safetensors", lambda f: load_file(str(f), device=str(map_location))) if model else {}
    ema_file = path / "ema.safetensors"
    averaged = None
    if ema and ema_file.is_file():
        averaged = read("ema.safetensors", lambda f: load_file(str(f), device=str(map_location)))
    extra = {}
    if state:
        extra = read("state.pt", lambda f: torch.load(f, map_location=map_location, weights_only=False))
    return Checkpoint(step=int(meta["step"]), model=weights, ema=averaged, state=extra, meta=meta, path=path)
