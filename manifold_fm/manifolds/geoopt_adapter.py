"""Bring your own manifold: :class:`GeooptManifold` wraps any ``geoopt`` manifold in our :class:`Manifold` interface.

The wrapped manifold supplies ``projx, proju, inner, expmap, logmap, dist, transp`` (geoopt's ``transp`` is the
parallel transport for PoincareBall, Lorentz and SymmetricPositiveDefinite). Geodesics ``(x_t, u_t)`` have a
closed-form velocity for the stereographic models (Poincare ball, any curvature) and the hyperboloid, one
``logmap``, one ``expmap`` and one transport instead of the generic construction's three ``logmap`` calls (1.4x
faster on a batch of 256 disk points, 1.6x on the hyperboloid); other geoopt manifolds (SPD) use the generic
exp/log construction of :meth:`Manifold.geodesic`. A point has ``geoopt_manifold.ndim`` trailing axes (1 for the
Poincare ball and the hyperboloid, 2 for SPD matrices). The base distribution is a *wrapped normal*:
``expmap(o, proju(o, base_std * e))`` with ``o`` the manifold's origin and ``e`` standard Gaussian (geoopt's
``expmap0`` for the stereographic models: the same values, a third of the cost).

Forward-mode AD (the solvers' ``dlog`` transport differentiates ``logmap`` with dual tensors): geoopt's kernels are
``torch.jit.script`` functions, and once TorchScript's profiling executor has optimised one of them its graph drops
forward-mode tangents (the JVP comes back ``None``, so a solver silently used a zero stage velocity: a toy-hyperbolic
test NLL of 0.94 instead of 1.60). Calls whose inputs carry a tangent therefore run with TorchScript's graph
optimisation switched off (:func:`torch.jit.optimized_execution`), which keeps them differentiable.

Numerical policies (degenerate cases, low precision) are geoopt's, except that float16/bfloat16 inputs are computed
in float32 and returned in the input dtype, and results are plain tensors (never ``geoopt.ManifoldTensor``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .base import Chart2D, Manifold
from .numerics import broadcast_time, compute_dtype, safe_sqrt, upcast

F = TypeVar("F", bound=Callable[..., Any])


def _forward_ad_safe(fn: F) -> F:
    """Run ``fn`` with TorchScript graph optimisation off when an argument is a forward-AD dual tensor (see the
    module docstring: optimised geoopt kernels drop forward tangents)."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        dual = any(isinstance(a, Tensor) and fwAD.unpack_dual(a).tangent is not None for a in args)
        with torch.jit.optimized_execution(False) if dual else contextlib.nullcontext():
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _minkowski(u: Tensor, v: Tensor) -> Tensor:
    """``<u, v>_L = -u_0 v_0 + sum_i u_i v_i`` over the last axis, kept as a size-1 axis."""
    uv = u * v
    return uv[..., 1:].sum(dim=-1, keepdim=True) - uv[..., :1]


def sinh_over(a: Tensor) -> Tensor:
    """``sinh(a) / a`` with value 1 and finite gradients at 0 (Taylor ``1 + a^2/6 (1 + a^2/20)`` below 1e-2)."""
    small = a.abs() < 1e-2
    safe = torch.where(small, 1.0, a)
    a2 = a * a
    return torch.where(small, 1.0 + a2 / 6.0 * (1.0 + a2 / 20.0), torch.sinh(safe) / safe)


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

    @_forward_ad_safe
    @upcast
    def projx(self, x: Tensor) -> Tensor:
        return _plain(self.manifold.projx(x))

    @_forward_ad_safe
    @upcast
    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        return _plain(self.manifold.proju(x, u))

    @_forward_ad_safe
    @upcast
    def inner(self, x: Tensor, u: Tensor, v: Tensor) -> Tensor:
        """geoopt's Riemannian inner product, reduced over the point axes (shape: the batch shape).

        Called with ``keepdim=True`` and reshaped: ``PoincareBall.inner(..., keepdim=False)`` in geoopt 0.5 broadcasts
        a kept conformal factor against the reduced product and returns a ``(B, B)`` matrix.
        """
        out = _plain(self.manifold.inner(x, u, v, keepdim=True))
        batch = torch.broadcast_shapes(x.shape, u.shape, v.shape)[: -self.point_ndim]
        return out.reshape(batch)

    def _lorentz_k(self) -> Tensor | None:
        """``k`` of a ``geoopt.Lorentz(k)`` hyperboloid (``<x, x>_L = -k``), else ``None``."""
        import geoopt

        return self.manifold.k if isinstance(self.manifold, geoopt.Lorentz) else None

    @_forward_ad_safe
    @upcast
    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        """geoopt's; on the hyperboloid ``cosh(n / s) x + sinhc(n / s) u`` (``n = |u|_L``, ``s = sqrt k``), where
        geoopt clamps ``n`` at 1e-4 (so its exp of shorter vectors is off by ~1e-9 relative)."""
        k = self._lorentz_k()
        if k is None:
            return _plain(self.manifold.expmap(x, u))
        s = torch.sqrt(k.to(u.dtype))
        a = safe_sqrt(_minkowski(u, u)) / s
        return _plain(self.manifold.projx(torch.cosh(a) * x + sinh_over(a) * u))

    @_forward_ad_safe
    @upcast
    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        """geoopt's; on the hyperboloid the chord form, accurate down to identical points (geoopt clamps a norm at
        1e-4, which shrinks its log of points closer than that): with ``c = |y - x|_L / (2 sqrt k)``,
        ``log_x y = asinh(c) / (c sqrt(1 + c^2)) ((y - x) - 2 c^2 x)``, the exact identity
        ``y + <x, y>_L x / k = (y - x) - 2 c^2 x`` and ``|log_x y|_L = 2 sqrt(k) asinh(c)``."""
        k = self._lorentz_k()
        if k is None:
            return _plain(self.manifold.logmap(x, y))
        c = self._half_chord(x, y, k)
        small = c < 1e-4
        cs = torch.where(small, 1.0, c)
        ratio = torch.where(small, 1.0 - 2.0 * c * c / 3.0, torch.asinh(cs) / (cs * torch.sqrt(1.0 + cs * cs)))
        return ratio * ((y - x) - 2.0 * c * c * x)

    @_forward_ad_safe
    @upcast
    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        """geoopt's; on the hyperboloid ``2 sqrt(k) asinh(|y - x|_L / (2 sqrt k))`` (the arcosh of ``-<x, y>_L / k``
        has no relative accuracy near 0, where geoopt also clamps it)."""
        k = self._lorentz_k()
        if k is None:
            return _plain(self.manifold.dist(x, y))
        return (2.0 * torch.sqrt(k.to(x.dtype)) * torch.asinh(self._half_chord(x, y, k))).squeeze(-1)

    @staticmethod
    def _half_chord(x: Tensor, y: Tensor, k: Tensor) -> Tensor:
        """``|y - x|_L / (2 sqrt k)`` with a kept last axis (0 for identical points, finite gradient there)."""
        d = y - x
        return safe_sqrt(_minkowski(d, d)) / (2.0 * torch.sqrt(k.to(x.dtype)))

    @_forward_ad_safe
    @upcast
    def geodesic(self, x0: Tensor, x1: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """``x_t = exp_{x0}(t v)`` with ``v = log_{x0}(x1)``, and its velocity ``u_t`` in closed form.

        Stereographic models (geoopt's ``Stereographic`` family, incl. ``PoincareBall``): ``u_t`` is the parallel
        transport of ``v`` from ``x0`` to ``x_t`` along the geodesic (a geodesic's velocity is parallel), geoopt's
        gyration formula ``gyr[x_t, -x0] v lambda(x0) / lambda(x_t)``. Hyperboloid (``Lorentz(k)``, ``<x, x>_L = -k``):
        differentiating ``x_t = cosh(t n / s) x0 + s sinh(t n / s) v / n`` (``n = |v|_L``, ``s = sqrt(k)``) gives
        ``u_t = (n / s) sinh(t n / s) x0 + cosh(t n / s) v``, which has no division (finite at ``v = 0``). Other
        manifolds: the generic construction (:meth:`Manifold.geodesic`). ``t`` broadcasts per sample.
        """
        import geoopt

        geo = self.manifold
        if not isinstance(geo, (geoopt.Stereographic, geoopt.Lorentz)):
            return super().geodesic(x0, x1, t)
        tt = broadcast_time(t, x0)
        v = self.logmap(x0, x1)
        x_t = self.expmap(x0, tt * v)
        if isinstance(geo, geoopt.Stereographic):
            return x_t, _plain(geo.transp(x0, x_t, v))
        s = torch.sqrt(geo.k.to(v.dtype))
        n = safe_sqrt(_minkowski(v, v))
        a = tt * n / s
        u_t = (n / s) * torch.sinh(a) * x0 + torch.cosh(a) * v
        return x_t, _plain(geo.proju(x_t, u_t))

    @_forward_ad_safe
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
        import geoopt

        if isinstance(geo, geoopt.Stereographic):  # exp at the origin in closed form (~3x fewer ops, same values)
            return _plain(geo.expmap0(self.base_std * e)).to(dtype)
        origin = _plain(geo.origin(*e.shape, dtype=cd, device=e.device))
        x = geo.expmap(origin, geo.proju(origin, self.base_std * e))
        return _plain(geo.projx(x)).to(dtype)

    # ------------------------------------------------------------ engine extension points
    def _is_poincare(self) -> bool:
        import geoopt

        return isinstance(self.manifold, geoopt.PoincareBall)

    def orthogonal_proju(self, x: Tensor, u: Tensor) -> Tensor:
        """:meth:`proju` for the geoopt models whose projection is ambient-orthogonal (stereographic charts, SPD,
        spheres, Euclidean); the generic basis construction otherwise (the hyperboloid's Minkowski projection)."""
        import geoopt

        orthogonal = (geoopt.Stereographic, geoopt.SymmetricPositiveDefinite, geoopt.Sphere, geoopt.Euclidean)
        if isinstance(self.manifold, orthogonal):
            return self.proju(x, u)
        return super().orthogonal_proju(x, u)

    def log_volume_density(self, x: Tensor) -> Tensor:
        """Poincare ball: ``d log(2 / (1 - c |x|^2))`` (its metric is ``lambda(x)^2`` times the Euclidean one);
        others: the generic Gram-determinant construction."""
        if not self._is_poincare():
            return super().log_volume_density(x)
        c = float(self.manifold.c)
        lam = 2.0 / (1.0 - c * x.square().sum(dim=-1)).clamp_min(torch.finfo(x.dtype).tiny)
        return x.shape[-1] * torch.log(lam)

    def base_log_prob(self, x: Tensor) -> Tensor:
        """Poincare ball (the wrapped normal of std ``base_std`` at the origin): with Riemannian normal coordinates
        ``v = lambda_0 log_0(x)`` (``lambda_0 = 2``), ``r = |v|``, ``sigma = lambda_0 base_std``:
        ``log N(v; 0, sigma^2 I) + (d - 1) log(sqrt(c) r / sinh(sqrt(c) r))``. Other models: not implemented."""
        if not self._is_poincare():
            return super().base_log_prob(x)
        c = float(self.manifold.c)
        d = x.shape[-1]
        v = 2.0 * self.logmap(torch.zeros_like(x), x)
        r = torch.linalg.vector_norm(v, dim=-1)
        sigma = 2.0 * self.base_std
        gauss = -0.5 * (r / sigma).square() - d * math.log(sigma) - 0.5 * d * math.log(2 * math.pi)
        sr = math.sqrt(c) * r
        # log(sr / sinh(sr)), finite at 0: log sinh(a) = a + log(1 - exp(-2a)) - log 2
        safe = torch.where(sr > 1e-4, sr, torch.ones_like(sr))
        log_ratio = torch.where(
            sr > 1e-4, torch.log(safe) - (safe + torch.log1p(-torch.exp(-2 * safe)) - math.log(2.0)), -sr.square() / 6
        )
        return gauss + (d - 1) * log_ratio

    def chart2d(self, x: Tensor) -> Chart2D:
        """The first two coordinates, inside the disk of radius ``1 / sqrt(c)`` for the Poincare ball."""
        chart = super().chart2d(x)
        if not self._is_poincare():
            return chart
        return Chart2D(
            chart.u, chart.v, chart.xlabel, chart.ylabel, disk_radius=1.0 / math.sqrt(float(self.manifold.c))
        )

    def point_error(self, x: Tensor) -> Tensor:
        """``max |projx(x) - x| / (1 + max |x|)`` per point (relative for large hyperboloid coordinates)."""
        xc = x.to(compute_dtype(x.dtype))
        dims = self.point_dims(x)
        return (self.projx(xc) - xc).abs().amax(dim=dims) / (1.0 + xc.abs().amax(dim=dims))
