"""The tokenizer interface and latent normalisation.

A tokenizer maps images ``(B, 3, H, W)`` in ``[-1, 1]`` to latents ``(B, C, H/f, W/f)``: ``C = d`` channels per
token (the channel axis is 1), ``f`` the downsampling factor. ``encode`` returns the deterministic posterior mode
passed through the tokenizer's :class:`LatentNormalization`; ``decode`` undoes it and returns images in ``[-1, 1]``.
The raw (un-normalised) maps are ``encode_raw`` / ``decode_raw``; decoder finetuning trains ``decoder_module()``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import write_json_atomic


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
            (per-channel mean/std over a dataset, see :func:`compute_channel_stats`) or ``"batchnorm"`` (FLUX.2).
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
                raise ValueError(
                    f"LatentNormalization {name} must be a scalar, (C,) or (C, p, p); got {tuple(t.shape)}"
                )
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"LatentNormalization {name} has non-finite entries")
        if bool((self.scale == 0).any()):
            raise ValueError("LatentNormalization scale has zero entries; a channel with zero std cannot be scaled")

    @staticmethod
    def _shaped(t: Tensor, z: Tensor) -> Tensor:
        t = t.to(device=z.device, dtype=z.dtype)
        if t.ndim == 0:
            return t
        if t.shape[0] != z.shape[1]:
            raise ValueError(
                f"latent normalisation has {t.shape[0]} channels but the latents have {z.shape[1]} (shape "
                f"{tuple(z.shape)}); use the statistics computed for this tokenizer"
            )
        if t.ndim == 1:
            return t.view(1, -1, *([1] * (z.ndim - 2)))
        ph, pw = t.shape[1:]
        h, w = z.shape[-2:]
        if h % ph or w % pw:
            raise ValueError(f"latent grid {h}x{w} is not a multiple of the normalisation pattern {ph}x{pw}")
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
            raise ValueError(f"latent normalisation record lacks key {exc}; expected shift, scale, kind") from None

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
            raise ValueError(f"latent statistics file {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def check_images(images: Tensor, downsample: int) -> None:
    """Raise ``ValueError`` (one line) unless ``images`` is a finite ``(B, 3, H, W)`` batch in ``[-1, 1]``."""
    if not torch.is_tensor(images) or not images.is_floating_point():
        raise ValueError(f"images must be a floating torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % downsample or w % downsample:
        raise ValueError(f"image size {h}x{w} must be divisible by the tokenizer's downsampling factor {downsample}")
    if images.numel() == 0:
        return
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN/Inf values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.05 or hi > 1.05:
        raise ValueError(f"images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; map x in [0, 1] to 2x - 1")


def check_latents(latents: Tensor, channels: int) -> None:
    """Raise ``ValueError`` unless ``latents`` is a finite ``(B, C, h, w)`` batch with ``C = channels``."""
    if not torch.is_tensor(latents) or not latents.is_floating_point():
        raise ValueError(f"latents must be a floating torch.Tensor, got {type(latents).__name__}")
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise ValueError(f"latents must have shape (B, {channels}, h, w), got {tuple(latents.shape)}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("latents contain NaN/Inf values")


class Tokenizer(ABC):
    """An image tokenizer (autoencoder) with a fixed latent normalisation.

    Attributes:
        name: an id string recorded in latent-cache manifests.
        latent_channels: ``d``, channels per token.
        downsample: ``f``, the spatial downsampling factor.
        channel_axis: the token (sphere) axis of the latents, always 1.
        normalization: the :class:`LatentNormalization` applied by ``encode`` and undone by ``decode``.
    """

    name: str = "tokenizer"
    latent_channels: int
    downsample: int
    channel_axis: int = 1
    normalization: LatentNormalization

    # ----------------------------------------------------------- required
    @abstractmethod
    def encode_raw(self, images: Tensor) -> Tensor:
        """Posterior mode of the encoder, un-normalised: ``(B, 3, H, W) -> (B, C, H/f, W/f)``."""

    @abstractmethod
    def decode_raw(self, latents: Tensor) -> Tensor:
        """Decode un-normalised latents to images in ``[-1, 1]`` (clamped)."""

    @abstractmethod
    def decoder_module(self) -> nn.Module:
        """The module mapping raw latents to images (unclamped); decoder finetuning trains a copy of it."""

    @abstractmethod
    def modules(self) -> Iterable[nn.Module]:
        """Every ``nn.Module`` holding the tokenizer's weights (for ``to`` / ``eval``)."""

    # ----------------------------------------------------------- derived
    def encode(self, images: Tensor) -> Tensor:
        """``normalize(encode_raw(images))``: latents ``(B, C, H/f, W/f)`` on the tokenizer's device and dtype."""
        check_images(images, self.downsample)
        return self.normalization.normalize(self.encode_raw(images.to(self.device, self.dtype)))

    def decode(self, latents: Tensor) -> Tensor:
        """``decode_raw(denormalize(latents))``: images ``(B, 3, H, W)`` in ``[-1, 1]``."""
        check_latents(latents, self.latent_channels)
        return self.decode_raw(self.normalization.denormalize(latents.to(self.device, self.dtype)))

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents of a square image of side ``image_size``."""
        return (self.latent_channels, image_size // self.downsample, image_size // self.downsample)

    @property
    def device(self) -> torch.device:
        return next(p for m in self.modules() for p in m.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for m in self.modules() for p in m.parameters()).dtype

    def to(self, *args: Any, **kwargs: Any) -> Tokenizer:
        """Move/cast the weights like ``nn.Module.to``; returns ``self``."""
        for m in self.modules():
            m.to(*args, **kwargs)
        return self

    def eval(self) -> Tokenizer:
        for m in self.modules():
            m.eval()
        return self

    def requires_grad_(self, flag: bool = True) -> Tokenizer:
        for m in self.modules():
            m.requires_grad_(flag)
        return self

    def with_normalization(self, normalization: LatentNormalization) -> Tokenizer:
        """Use ``normalization`` from now on (e.g. per-channel dataset statistics); returns ``self``."""
        self.normalization = normalization
        return self

    def describe(self) -> dict[str, Any]:
        """A JSON-safe description for manifests and reports."""
        return {
            "name": self.name,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
            "channel_axis": self.channel_axis,
            "normalization": self.normalization.to_dict(),
        }


@torch.no_grad()
def compute_channel_stats(
    tokenizer: Tokenizer,
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int = 64,
    max_items: int | None = None,
    progress: bool = False,
) -> LatentNormalization:
    """Per-channel mean and std of the raw latents over a dataset: ``shift = mean``, ``scale = 1 / std``.

    Statistics pool every spatial position and image; accumulated in float64 (sum and sum of squares). With
    ``max_items`` below the dataset size, items are spread evenly over the dataset (class folders are contiguous).
    Unreadable images (:class:`~manifold_fm.data.images.ImageReadError`) are skipped and counted in ``meta``.
    """
    from tqdm.auto import tqdm

    from ..data.images import ImageReadError

    size = len(dataset)  # type: ignore[arg-type]
    n = size if max_items is None else min(max_items, size)
    if n == 0:
        raise ValueError("cannot compute latent statistics over an empty dataset")
    order = torch.linspace(0, size - 1, n).round().long().tolist() if n < size else list(range(size))
    render = getattr(dataset, "render", None)
    total = torch.zeros((), dtype=torch.float64)
    s1 = s2 = None
    skipped = 0
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc="latent stats"):
        idx = order[start : start + batch_size]
        if callable(render):
            images = render(idx)[0]
        else:
            items = []
            for i in idx:
                try:
                    items.append(dataset[i][0])
                except ImageReadError:
                    skipped += 1
            if not items:
                continue
            images = torch.stack(items)
        z = tokenizer.encode_raw(images.to(tokenizer.device, tokenizer.dtype)).double()
        zs = z.transpose(0, 1).reshape(z.shape[1], -1)
        s1 = zs.sum(1) if s1 is None else s1 + zs.sum(1)
        s2 = (zs**2).sum(1) if s2 is None else s2 + (zs**2).sum(1)
        total += zs.shape[1]
    if s1 is None or s2 is None:
        raise ValueError("no readable image to compute latent statistics from")
    mean = s1 / total
    var = (s2 / total - mean**2).clamp_min(0)
    std = var.sqrt().clamp_min(1e-8)
    return LatentNormalization(
        shift=mean, scale=1.0 / std, kind="dataset",
        meta={"items": n - skipped, "skipped": skipped, "tokenizer": tokenizer.name},
    )
