"""Latent normalisation: the affine map between a tokenizer's raw latents and the latents a flow is trained on.

:class:`LatentNormalization` holds ``shift`` and ``scale`` (scalar, per channel, or a periodic per-channel pattern)
and round-trips through JSON. Tokenizers apply it in ``encode`` / ``decode``
(:class:`~manifold_fm.tokenizers.Tokenizer`); latent caches record it in their manifest
(:class:`~manifold_fm.data.latents.LatentCache`). It is public as ``manifold_fm.tokenizers.LatentNormalization``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import write_json_atomic
from ..errors import InputError


def _as_tensor(v: float | Tensor) -> Tensor:
    return v.detach().clone().double() if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64)


@dataclass
class LatentNormalization:
    """``normalize(z) = (z - shift) * scale`` and its inverse ``denormalize(y) = y / scale + shift``.

    The diffusers convention (``scaling_factor``, ``shift_factor``). ``shift`` and ``scale`` are each a scalar, a
    per-channel vector ``(C,)``, or a periodic per-channel pattern ``(C, p, p)`` tiled over the latent grid (FLUX.2's
    batch-norm statistics are per channel of the 2x2-patchified latent, i.e. per channel and sub-pixel position).

    Attributes:
        kind: where the constants come from: ``"identity"``, ``"constants"`` (the tokenizer's own), ``"dataset"``
            (per-channel mean/std over a dataset, see :func:`~manifold_fm.tokenizers.compute_channel_stats`) or
            ``"batchnorm"`` (FLUX.2).
    """

    shift: float | Tensor = 0.0
    scale: float | Tensor = 1.0
    kind: str = "identity"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shift = _as_tensor(self.shift)
        self.scale = _as_tensor(self.scale)
        for name, t in (("shift", self.shift), ("scale", self.scale)):
            if t.ndim not in (0, 1, 3):
                raise InputError(
                    f"LatentNormalization {name} must be a scalar, (C,) or (C, p, p); got {tuple(t.shape)}"
                )
            if not bool(torch.isfinite(t).all()):
                raise InputError(f"LatentNormalization {name} has non-finite entries")
        if bool((self.scale == 0).any()):
            raise InputError("LatentNormalization scale has zero entries; a channel with zero std cannot be scaled")

    @staticmethod
    def _shaped(t: Tensor, z: Tensor) -> Tensor:
        t = t.to(device=z.device, dtype=z.dtype)
        if t.ndim == 0:
            return t
        if t.shape[0] != z.shape[1]:
            raise InputError(
                f"latent normalisation has {t.shape[0]} channels but the latents have {z.shape[1]} (shape "
                f"{tuple(z.shape)}); use the statistics computed for this tokenizer"
            )
        if t.ndim == 1:
            return t.view(1, -1, *([1] * (z.ndim - 2)))
        ph, pw = t.shape[1:]
        h, w = z.shape[-2:]
        if h % ph or w % pw:
            raise InputError(f"latent grid {h}x{w} is not a multiple of the normalisation pattern {ph}x{pw}")
        return t.repeat(1, h // ph, w // pw).unsqueeze(0)

    def normalize(self, z: Tensor) -> Tensor:
        """``(z - shift) * scale`` with the constants broadcast over ``(B, C, h, w)``."""
        return (z - self._shaped(self.shift, z)) * self._shaped(self.scale, z)

    def denormalize(self, y: Tensor) -> Tensor:
        """``y / scale + shift``: the inverse of :meth:`normalize`."""
        return y / self._shaped(self.scale, y) + self._shaped(self.shift, y)

    @property
    def is_identity(self) -> bool:
        return bool((self.shift == 0).all()) and bool((self.scale == 1).all())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe mapping (nested lists for tensors)."""
        return {"kind": self.kind, "shift": self.shift.tolist(), "scale": self.scale.tolist(), "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatentNormalization:
        try:
            return cls(
                shift=torch.tensor(data["shift"], dtype=torch.float64),
                scale=torch.tensor(data["scale"], dtype=torch.float64),
                kind=str(data.get("kind", "constants")),
                meta=dict(data.get("meta", {})),
            )
        except KeyError as exc:
            raise InputError(f"latent normalisation record lacks key {exc}; expected shift, scale, kind") from None

    def save(self, path: str | Path) -> None:
        """Write as JSON (atomically), e.g. next to a tokenizer as ``latent_stats.json``."""
        write_json_atomic(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> LatentNormalization:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"latent statistics file {path} does not exist; compute it with compute_channel_stats"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"latent statistics file {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)
