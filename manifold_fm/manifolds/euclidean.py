"""Flat Euclidean space: the linear flow-matching baseline's manifold."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Manifold
from .numerics import broadcast_time, upcast


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

    def dlogmap(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """``v``: ``log_x(y) = y - x`` is affine in ``y``."""
        return v

    def orthogonal_proju(self, x: Tensor, u: Tensor) -> Tensor:
        return u

    def log_volume_density(self, x: Tensor) -> Tensor:
        """0: the flat metric."""
        return torch.zeros(x.shape[: x.ndim - len(self.point_dims(x))], dtype=x.dtype, device=x.device)

    def base_log_prob(self, x: Tensor) -> Tensor:
        """The standard normal: ``sum -x^2/2 - log(2 pi)/2`` over the point axes."""
        return self.reduce(-0.5 * x.square() - 0.5 * math.log(2 * math.pi), x)

    def pairwise_sq_dist(self, x0: Tensor, x1: Tensor) -> Tensor:
        """``|x0_i - x1_j|^2`` over every non-batch axis by ``torch.cdist`` (pairwise differences, not the
        ``|a|^2 + |b|^2 - 2<a, b>`` expansion, which cancels for nearby points)."""
        a, b = x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1)
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").square()

    def point_error(self, x: Tensor) -> Tensor:
        return torch.zeros(x.shape[: x.ndim - len(self.point_dims(x))], dtype=x.dtype, device=x.device)
