"""Flat Euclidean space: the linear flow-matching baseline's manifold."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._numerics import broadcast_time, upcast
from .base import Manifold


class Euclidean(Manifold):
    """``R^n`` with the flat metric. ``point_ndim=None`` (default): every axis but the leading batch axis is one
    point, so ``(B, C, H, W)`` latents and ``(B, D)`` vectors both reduce to ``(B,)``; pass ``point_ndim=k`` to make
    the trailing ``k`` axes a point instead. Geodesics are straight lines: ``x_t = (1-t) x0 + t x1``,
    ``u_t = x1 - x0``; the prior is the standard Gaussian.
    """

    name = "euclidean"

    def __init__(self, point_ndim: int | None = None) -> None:
        self.point_ndim = point_ndim

    def __repr__(self) -> str:
        return "Euclidean()" if self.point_ndim is None else f"Euclidean(point_ndim={self.point_ndim})"

    def projx(self, x: Tensor) -> Tensor:
        return x

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        return u

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        return x + u

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        return y - x

    @upcast
    def geodesic(self, x0: Tensor, x1: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        u = x1 - x0
        return torch.addcmul(x0, broadcast_time(t, x0), u), u

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return v

    def random_base(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        return torch.randn(tuple(shape), generator=generator, dtype=dtype or torch.get_default_dtype(), device=device)

    def point_error(self, x: Tensor) -> Tensor:
        return torch.zeros(x.shape[: x.ndim - len(self.point_dims(x))], dtype=x.dtype, device=x.device)
