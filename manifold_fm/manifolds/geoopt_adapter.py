"""Bring your own manifold: :class:`GeooptManifold` wraps any ``geoopt`` manifold in our :class:`Manifold` interface.

The wrapped manifold supplies ``projx, proju, inner, expmap, logmap, dist, transp`` (geoopt's ``transp`` is the
parallel transport for PoincareBall, Lorentz and SymmetricPositiveDefinite); geodesics come from the generic
exp/log construction of :meth:`Manifold.geodesic`. A point has ``geoopt_manifold.ndim`` trailing axes (1 for the
Poincare ball and the hyperboloid, 2 for SPD matrices). The base distribution is a *wrapped normal*:
``expmap(o, proju(o, base_std * e))`` with ``o`` the manifold's origin and ``e`` standard Gaussian.

Numerical policies (degenerate cases, low precision) are geoopt's, except that float16/bfloat16 inputs are computed
in float32 and returned in the input dtype, and results are plain tensors (never ``geoopt.ManifoldTensor``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._numerics import compute_dtype, upcast
from .base import Manifold


def _plain(x: Tensor) -> Tensor:
    """Drop geoopt's ``ManifoldTensor``/``ManifoldParameter`` subclass so results are ordinary tensors."""
    return x.as_subclass(Tensor) if type(x) is not Tensor else x


class GeooptManifold(Manifold):
    """Adapter around a ``geoopt.manifolds.Manifold`` instance.

    Args:
        manifold: e.g. ``geoopt.PoincareBall(c=1.0)``, ``geoopt.Lorentz()``, ``geoopt.SymmetricPositiveDefinite()``.
        base_std: standard deviation of the Gaussian in the origin's tangent space that :meth:`random_base` wraps
            onto the manifold (small values keep hyperbolic samples away from float round-off near the boundary).
    """

    # geoopt keeps curvatures as 0-d tensors, which follow the inputs' dtype under type promotion, so the wrapped
    # manifold is used as is (never moved or cast: it may be shared with the user's own code).
    def __init__(self, manifold: Any, base_std: float = 0.5) -> None:
        import geoopt

        if not isinstance(manifold, geoopt.manifolds.Manifold):
            raise ValueError(
                f"GeooptManifold wraps a geoopt manifold instance (e.g. geoopt.PoincareBall()), got {manifold!r}"
            )
        if not base_std > 0:
            raise ValueError(f"base_std must be positive, got {base_std!r}")
        self.manifold = manifold
        self.base_std = float(base_std)
        self.point_ndim = int(manifold.ndim)
        self.name = f"geoopt_{type(manifold).__name__.lower()}"

    def __repr__(self) -> str:
        return f"GeooptManifold({self.manifold!r}, base_std={self.base_std:g})"

    @upcast
    def projx(self, x: Tensor) -> Tensor:
        return _plain(self.manifold.projx(x))

    @upcast
    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        return _plain(self.manifold.proju(x, u))

    @upcast
    def inner(self, x: Tensor, u: Tensor, v: Tensor) -> Tensor:
        """geoopt's Riemannian inner product, reduced over the point axes (shape: the batch shape).

        Called with ``keepdim=True`` and reshaped: ``PoincareBall.inner(..., keepdim=False)`` in geoopt 0.5 broadcasts
        a kept conformal factor against the reduced product and returns a ``(B, B)`` matrix.
        """
        out = _plain(self.manifold.inner(x, u, v, keepdim=True))
        batch = torch.broadcast_shapes(x.shape, u.shape, v.shape)[: -self.point_ndim]
        return out.reshape(batch)

    @upcast
    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        return _plain(self.manifold.expmap(x, u))

    @upcast
    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        return _plain(self.manifold.logmap(x, y))

    @upcast
    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        return _plain(self.manifold.dist(x, y))

    @upcast
    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """geoopt's ``transp(x, y, v)``: parallel transport along the geodesic for the hyperbolic and SPD models."""
        return _plain(self.manifold.transp(x, y, v))

    def random_base(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Wrapped normal: ``expmap(o, proju(o, base_std * e))``, ``e ~ N(0, I)`` of the full ``shape``."""
        dtype = dtype or torch.get_default_dtype()
        cd = compute_dtype(dtype)
        e = torch.randn(tuple(shape), generator=generator, dtype=cd, device=device)
        geo = self.manifold
        origin = _plain(geo.origin(*e.shape, dtype=cd, device=e.device))
        x = geo.expmap(origin, geo.proju(origin, self.base_std * e))
        return _plain(geo.projx(x)).to(dtype)

    def point_error(self, x: Tensor) -> Tensor:
        """``max |projx(x) - x| / (1 + max |x|)`` per point (relative for large hyperboloid coordinates)."""
        xc = x.to(compute_dtype(x.dtype))
        dims = self.point_dims(x)
        return (self.projx(xc) - xc).abs().amax(dim=dims) / (1.0 + xc.abs().amax(dim=dims))

