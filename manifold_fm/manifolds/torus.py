"""The flat torus ``T^n = R^n / (2 pi Z)^n``: angles on the last axis, flat metric.

Points are stored as angles in ``[-pi, pi)``. Tangent vectors are arbitrary ``R^n`` vectors (every ambient vector is
tangent). With ``wrap(a) = (a + pi) mod 2 pi - pi``:

- ``expmap(x, u) = wrap(x + u)``, ``logmap(x, y) = wrap(y - x)`` (the shortest of the ``2 pi`` translates);
- ``geodesic``: ``x_t = wrap(x0 + t d)``, ``u_t = d`` with ``d = logmap(x0, x1)`` (constant velocity);
- ``transp`` is the identity (the torus is flat and parallelisable).

Degenerate case (one policy, tested): a coordinate exactly ``pi`` apart is *antipodal* on its circle; ``wrap`` maps
the difference to ``-pi``, so ``logmap`` goes the negative way round. ``projx`` has no zero-norm case (every real
vector is a valid angle vector after wrapping).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Manifold
from .numerics import broadcast_time, upcast


def wrap_angle(a: Tensor) -> Tensor:
    """Map angles to ``[-pi, pi)``: ``(a + pi) mod 2 pi - pi`` (identity up to rounding for ``a`` in range)."""
    out = torch.remainder(a + math.pi, 2 * math.pi) - math.pi
    # Rounding of (a + pi) can push an in-range value to exactly pi; keep the half-open interval.
    return torch.where(out >= math.pi, out - 2 * math.pi, out)


class FlatTorus(Manifold):
    """The flat torus ``(S^1)^n`` with angle coordinates on the last axis (``point_ndim=1``).

    The base distribution is uniform on ``[-pi, pi)^n``. ``dist(x, y) = |wrap(y - x)|``.
    """

    name = "flat_torus"
    point_ndim: int | None = 1
    periodic = True

    def __repr__(self) -> str:
        return "FlatTorus()"

    @upcast
    def projx(self, x: Tensor) -> Tensor:
        """Wrap every angle into ``[-pi, pi)``."""
        return wrap_angle(x)

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        """Identity: every ambient vector is tangent."""
        return u

    @upcast
    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        """``wrap(x + u)``."""
        return wrap_angle(x + u)

    @upcast
    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        """``wrap(y - x)``: the shortest signed angle per coordinate (``-pi`` for antipodal coordinates)."""
        return wrap_angle(y - x)

    @upcast
    def geodesic(self, x0: Tensor, x1: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """``x_t = wrap(x0 + t d)``, ``u_t = d`` with ``d = wrap(x1 - x0)``."""
        d = wrap_angle(x1 - x0)
        return wrap_angle(torch.addcmul(x0, broadcast_time(t, x0), d)), d

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """Identity (flat, parallelisable)."""
        return v

    def random_base(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Uniform angles in ``[-pi, pi)``."""
        dtype = dtype or torch.get_default_dtype()
        u = torch.rand(tuple(shape), generator=generator, dtype=dtype, device=device)
        return wrap_angle(2 * math.pi * u - math.pi)

    def dlogmap(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """``v``: ``log_x(y) = wrap(y - x)`` has unit derivative in ``y`` away from the cut."""
        return v

    def orthogonal_proju(self, x: Tensor, u: Tensor) -> Tensor:
        return u

    def base_log_prob(self, x: Tensor) -> Tensor:
        """Uniform on ``[-pi, pi)^n``: ``-n log(2 pi)`` per point."""
        return torch.full(x.shape[:-1], -x.shape[-1] * math.log(2 * math.pi), dtype=x.dtype, device=x.device)

    def point_error(self, x: Tensor) -> Tensor:
        """How far the coordinates lie outside ``[-pi, pi]`` (0 for a wrapped point)."""
        xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        out = (xc.abs() - math.pi).clamp_min(0.0)
        return out.amax(dim=self.point_dims(x))

    def vector_error(self, x: Tensor, u: Tensor) -> Tensor:
        """Always 0: every vector is tangent."""
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
