"""Products of heterogeneous manifolds laid out side by side on one flat last axis.

``Product([(Sphere(), 3), (FlatTorus(), 2)])`` is ``S^2 x T^2``: a point is a ``(..., 5)`` tensor whose first 3
entries are a unit 3-vector and whose last 2 are angles. A factor's shape may be a tuple for factors whose points
are matrices: ``(GeooptManifold(geoopt.SymmetricPositiveDefinite()), (2, 2))`` takes 4 entries, reshaped to
``(..., 2, 2)`` for that factor.

Everything acts factor-wise on the slices; the metric is the product metric, so
``inner = sum_i inner_i``, ``dist = sqrt(sum_i dist_i^2)``, and geodesics, exponential and logarithmic maps and
parallel transport are the factor-wise ones (all factors share the time ``t``). Degenerate-case policies are those
of the factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .base import Chart2D, Manifold, ManifoldError
from .numerics import broadcast_time, safe_sqrt, upcast


class Product(Manifold):
    """``M_1 x ... x M_k`` over a flat last axis of size ``sum_i prod(shape_i)``.

    Args:
        factors: ``(manifold, shape)`` pairs in layout order; ``shape`` is an int (a vector factor) or a tuple (e.g.
            ``(n, n)`` for a matrix manifold). Each factor's ``point_ndim`` must equal ``len(shape)``: use
            ``Euclidean(point_ndim=1)`` for a flat vector factor.
    """

    name = "product"
    point_ndim: int | None = 1

    def __init__(self, factors: Sequence[tuple[Manifold, int | Sequence[int]]]) -> None:
        if not factors:
            raise ValueError("Product needs at least one (manifold, shape) factor")
        self.factors: list[Manifold] = []
        self.shapes: list[tuple[int, ...]] = []
        self.slices: list[slice] = []
        start = 0
        for i, item in enumerate(factors):
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Manifold)):
                raise ValueError(f"Product factor {i} must be a (Manifold, shape) pair, got {item!r}")
            manifold, shape = item
            shape_t = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
            if not shape_t or any(s < 1 for s in shape_t):
                raise ValueError(f"Product factor {i} ({manifold!r}) has invalid shape {shape!r}")
            if manifold.point_ndim != len(shape_t):
                raise ValueError(
                    f"Product factor {i} ({manifold!r}) has point_ndim={manifold.point_ndim} but shape {shape_t} "
                    f"has {len(shape_t)} axes; use a factor whose points have exactly those axes "
                    "(e.g. Euclidean(point_ndim=1))"
                )
            size = math.prod(shape_t)
            self.factors.append(manifold)
            self.shapes.append(shape_t)
            self.slices.append(slice(start, start + size))
            start += size
        self.dim = start

    def __repr__(self) -> str:
        inner = ", ".join(
            f"({m!r}, {s[0] if len(s) == 1 else s})" for m, s in zip(self.factors, self.shapes, strict=True)
        )
        return f"Product([{inner}])"

    # ------------------------------------------------------------ layout
    def _check(self, x: Tensor) -> None:
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ManifoldError(
                f"{self.name}: expected a last axis of size {self.dim} (the factors laid side by side), "
                f"got shape {tuple(x.shape)}"
            )

    def split(self, x: Tensor) -> list[Tensor]:
        """The factor views of ``x``: slice ``i`` of the last axis reshaped to ``(..., *shape_i)``."""
        self._check(x)
        return [x[..., sl].reshape(*x.shape[:-1], *shp) for sl, shp in zip(self.slices, self.shapes, strict=True)]

    def join(self, parts: Sequence[Tensor]) -> Tensor:
        """Inverse of :meth:`split`: flatten each factor's trailing axes and concatenate on the last axis."""
        flat = [p.reshape(*p.shape[: p.ndim - len(shp)], -1) for p, shp in zip(parts, self.shapes, strict=True)]
        batch = torch.broadcast_shapes(*(f.shape[:-1] for f in flat))
        return torch.cat([f.expand(*batch, f.shape[-1]) for f in flat], dim=-1)

    def _map(self, fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
        split = [self.split(t) for t in tensors]
        return self.join([fn(m, *args) for m, *args in zip(self.factors, *split, strict=True)])

    def _sum(self, fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
        split = [self.split(t) for t in tensors]
        return sum(fn(m, *args) for m, *args in zip(self.factors, *split, strict=True))  # type: ignore[return-value]

    def _factor_time(self, t: float | Tensor, x: Tensor, shape: tuple[int, ...]) -> Tensor:
        tt = broadcast_time(t, x)
        if tt.ndim == 0:
            return tt
        # tt broadcasts against x (last axis size 1); give it the factor's trailing point axes instead.
        return tt.reshape(*tt.shape[:-1], *([1] * len(shape)))

    # ------------------------------------------------------------ geometry
    @upcast
    def projx(self, x: Tensor) -> Tensor:
        return self._map(lambda m, a: m.projx(a), x)

    @upcast
    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        return self._map(lambda m, a, b: m.proju(a, b), x, u)

    @upcast
    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        return self._map(lambda m, a, b: m.expmap(a, b), x, u)

    @upcast
    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        return self._map(lambda m, a, b: m.logmap(a, b), x, y)

    @upcast
    def inner(self, x: Tensor, u: Tensor, v: Tensor) -> Tensor:
        """``sum_i <u_i, v_i>_{x_i}`` (the product metric)."""
        return self._sum(lambda m, a, b, c: m.inner(a, b, c), x, u, v)

    @upcast
    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        """``sqrt(sum_i dist_i(x_i, y_i)^2)``."""
        return safe_sqrt(self._sum(lambda m, a, b: m.dist(a, b).square(), x, y))

    @upcast
    def geodesic(self, x0: Tensor, x1: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """Factor-wise geodesics sharing the time ``t``."""
        xs, us = [], []
        for m, shp, a, b in zip(self.factors, self.shapes, self.split(x0), self.split(x1), strict=True):
            xt, ut = m.geodesic(a, b, self._factor_time(t, x0, shp))
            xs.append(xt)
            us.append(ut)
        return self.join(xs), self.join(us)

    @upcast
    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return self._map(lambda m, a, b, c: m.transp(a, b, c), x, y, v)

    def random_base(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Independent samples of each factor's base distribution, joined on the last axis."""
        shape = tuple(shape)
        if not shape or shape[-1] != self.dim:
            raise ManifoldError(f"{self.name}: random_base shape must end with {self.dim}, got {shape}")
        parts = [
            m.random_base((*shape[:-1], *shp), generator=generator, dtype=dtype, device=device)
            for m, shp in zip(self.factors, self.shapes, strict=True)
        ]
        return self.join(parts)

    # ------------------------------------------------------------ engine extension points (factor-wise)
    def dlogmap(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """Factor by factor, so every factor uses its own (closed-form where it has one) differential."""
        return self._map(lambda m, a, b, c: m.dlogmap(a, b, c), x, y, v)

    def ambient_retract(self, y: Tensor) -> Tensor:
        return self._map(lambda m, a: m.ambient_retract(a), y)

    def orthogonal_proju(self, x: Tensor, u: Tensor) -> Tensor:
        return self._map(lambda m, a, b: m.orthogonal_proju(a, b), x, u)

    def log_volume_density(self, x: Tensor) -> Tensor:
        """``sum_i`` of the factors' (the product metric's volume is the product of the factors' volumes)."""
        return self._sum(lambda m, a: m.log_volume_density(a), x)

    def base_log_prob(self, x: Tensor) -> Tensor:
        """``sum_i`` of the factors' (:meth:`random_base` draws the factors independently)."""
        return self._sum(lambda m, a: m.base_log_prob(a), x)

    def chart2d(self, x: Tensor) -> Chart2D:
        """The first factor's chart."""
        return self.factors[0].chart2d(self.split(x)[0])

    def point_error(self, x: Tensor) -> Tensor:
        errs = [m.point_error(a).float() for m, a in zip(self.factors, self.split(x), strict=True)]
        return torch.stack(errs).amax(dim=0)

    def vector_error(self, x: Tensor, u: Tensor) -> Tensor:
        errs = [
            m.vector_error(a, b).float() for m, a, b in zip(self.factors, self.split(x), self.split(u), strict=True)
        ]
        return torch.stack(errs).amax(dim=0)
