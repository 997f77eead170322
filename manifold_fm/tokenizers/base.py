"""The tokenizer interface and latent statistics.

A tokenizer maps images ``(B, 3, H, W)`` in ``[-1, 1]`` to latents ``(B, C, H/f, W/f)``: ``C = d`` channels per
token (the channel axis is 1), ``f`` the downsampling factor. ``encode`` returns the deterministic posterior mode
passed through the tokenizer's :class:`LatentNormalization`; ``decode`` undoes it and returns images in ``[-1, 1]``.
The raw (un-normalised) maps are ``encode_raw`` / ``decode_raw``; decoder finetuning trains ``decoder_module()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from manifold_fm.errors import InputError

from ..data.normalization import LatentNormalization


def check_images(images: Tensor, downsample: int) -> None:
    """Raise ``ValueError`` (one line) unless ``images`` is a finite ``(B, 3, H, W)`` batch in ``[-1, 1]``."""
    if not torch.is_tensor(images) or not images.is_floating_point():
        raise InputError(f"images must be a floating torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % downsample or w % downsample:
        raise InputError(f"image size {h}x{w} must be divisible by the tokenizer's downsampling factor {downsample}")
    if images.numel() == 0:
        return
    if not bool(torch.isfinite(images).all()):
        raise InputError("images contain NaN/Inf values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.05 or hi > 1.05:
        raise InputError(f"images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; map x in [0, 1] to 2x - 1")


def check_latents(latents: Tensor, channels: int) -> None:
    """Raise ``ValueError`` unless ``latents`` is a finite ``(B, C, h, w)`` batch with ``C = channels``."""
    if not torch.is_tensor(latents) or not latents.is_floating_point():
        raise InputError(f"latents must be a floating torch.Tensor, got {type(latents).__name__}")
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise InputError(f"latents must have shape (B, {channels}, h, w), got {tuple(latents.shape)}")
    if not bool(torch.isfinite(latents).all()):
        raise InputError("latents contain NaN/Inf values")


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
    Unreadable images (:class:`~manifold_fm.data.image_folder.ImageReadError`) are skipped and counted in ``meta``.
    """
    from ..data.image_folder import ImageReadError
    from ..progress import progress_bar

    size = len(dataset)  # type: ignore[arg-type]
    n = size if max_items is None else min(max_items, size)
    if n == 0:
        raise InputError("cannot compute latent statistics over an empty dataset")
    order = torch.linspace(0, size - 1, n).round().long().tolist() if n < size else list(range(size))
    render = getattr(dataset, "render", None)
    total = torch.zeros((), dtype=torch.float64)
    s1 = s2 = None
    skipped = 0
    for start in progress_bar(range(0, n, batch_size), disable=not progress, desc="latent stats"):
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
        raise InputError("no readable image to compute latent statistics from")
    mean = s1 / total
    var = (s2 / total - mean**2).clamp_min(0)
    std = var.sqrt().clamp_min(1e-8)
    return LatentNormalization(
        shift=mean,
        scale=1.0 / std,
        kind="dataset",
        meta={"items": n - skipped, "skipped": skipped, "tokenizer": tokenizer.name},
    )
