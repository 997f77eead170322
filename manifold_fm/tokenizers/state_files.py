"""Reading tensors out of local checkpoint files (``.safetensors``, ``.pt`` / ``.pth`` / ``.ckpt``).

Pickled checkpoints are read with ``torch.load(weights_only=True)``: plain tensors, dicts, lists and numbers load,
arbitrary Python objects do not (a full PyTorch-Lightning checkpoint can hold some in its hyper-parameters). Such a
file loads only with ``trust_pickle=True``, which runs its pickled code: pass it only for files you trust.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from manifold_fm.errors import InputError


def load_state_file(path: str | Path, what: str = "checkpoint", *, trust_pickle: bool = False) -> dict[str, Any]:
    """The top-level mapping stored in ``path``; one-line ``FileNotFoundError`` / ``ValueError`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        obj = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # noqa: BLE001 - any unpickling/format failure is one "unreadable" error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            "; it holds Python objects besides tensors: re-save its state_dict, or pass --trust-pickle if you trust "
            "the file"
            if not trust_pickle and "weights_only" in str(exc)
            else ""
        )
        raise InputError(f"{what} {path} is unreadable: {first[:200]}{hint}") from None
    if not isinstance(obj, Mapping):
        raise InputError(f"{what} {path} holds a {type(obj).__name__}, not a mapping of tensors")
    return dict(obj)


def tensor_state(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """The tensors of a checkpoint mapping: its ``"state_dict"`` (Lightning / LDM) or ``"model"`` entry when it has
    one, else the mapping itself; non-tensor entries are dropped."""
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
            obj = inner
            break
    return {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
