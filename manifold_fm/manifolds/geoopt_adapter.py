"""Bring your own manifold: :class:`GeooptManifold` wraps any ``geoopt`` manifold in our :class:`Manifold` interface.

The wrapped manifold supplies ``projx, proju, inner, expmap, logmap, dist, transp`` (geoopt's ``transp`` is the
parallel transport for PoincareBall, Lorentz and SymmetricPositiveDefinite). Geodesics ``(x_t, u_t)`` have a
closed-form velocity for the stereographic models (Poincare ball, any curvature) and the hyperboloid, one
``logmap``, one ``expmap`` and one transport instead of the generic construction's three ``logmap`` calls; SPD
matrices have them from two symmetric eigendecompositions; other geoopt manifolds use the
generic exp/log construction of :meth:`Manifold.geodesic`. A point has ``geoopt_manifold.ndim`` trailing axes (1 for the
Poincare ball and the hyperboloid, 2 for SPD matrices). The base distribution is a *wrapped normal*:
``expmap(o, proju(o, base_std * e))`` with ``o`` the manifold's origin and ``e`` standard Gaussian (geoopt's
``expmap0`` for the stereographic models: the same values, a third of the cost). Its density with respect to the
Riemannian volume (:meth:`GeooptManifold.base_log_prob`) is in closed form for the Poincare ball, the hyperboloid and
SPD matrices: a Gaussian in normal coordinates at ``o`` divided by the Jacobian of ``exp_o``.

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
from types import ModuleType
from typing import Any, TypeVar

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .base import Chart2D, Manifold
from .numerics import broadcast_time, compute_dtype, jit_script_deprecation_silenced, safe_sqrt, upcast

F = TypeVar("F", bound=Callable[..., Any])


@functools.cache
def import_geoopt() -> ModuleType:
    """``geoopt``, imported on first use (it compiles TorchScript kernels on import) without the ``FutureWarning``
    that raises on recent torch (:func:`~manifold_fm.manifolds.numerics.jit_script_deprecation_silenced`, for this
    import only). Every ``geoopt`` import in the package goes through here (cached: later calls cost a lookup).

    geoopt's SPD matrix functions script their kernels on first use instead (``geoopt.linalg.sym_funcm``, cached per
    function), which would raise the warning in the middle of a run; each SPD operation is run once here, on the
    2x2 identity, so they are scripted now. (Silencing every call instead would reset Python's once-per-location
    warning registry on each one.)"""
    with jit_script_deprecation_silenced():
        import geoopt

        spd, x = geoopt.SymmetricPositiveDefinite(), torch.eye(2)[None]
        u = torch.zeros_like(x)
        spd.inner(spd.projx(x), spd.proju(x, u), u)
        spd.logmap(spd.expmap(x, u), spd.retr(x, u))
        spd.transp(x, x, u), spd.dist(x, x)
    return geoopt


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


def log_sinhc(a: Tensor) -> Tensor:
    """``log(sinh(a) / a)`` (even in ``a``), finite with finite gradients at 0 and for large ``|a|``: Taylor
    ``a^2 / 6`` below 1e-4, else ``|a| + log(-expm1(-2|a|) / (2|a|))`` (no overflow, no cancellation)."""
    b = a.abs()
    small = b < 1e-4
    safe = torch.where(small, torch.ones_like(b), b)
    return torch.where(small, b * b / 6.0, safe + torch.log(-torch.expm1(-2.0 * safe) / (2.0 * safe)))


def spd_wrapped_normal_log_prob(x: Tensor, std: float | Tensor) -> Tensor:
    """``log p(x)`` of the wrapped normal at the identity on SPD matrices ``x (..., n, n)`` with the affine-invariant
    metric ``<U, V>_X = tr(X^-1 U X^-1 V)``, w.r.t. its Riemannian volume; shape ``x.shape[:-2]``.

    The distribution: ``X = expm(S)`` with ``S`` standard normal of variance ``std^2`` in orthonormal coordinates of
    ``T_I`` (``S_ii`` and ``sqrt(2) S_ij``, ``i < j``: ``m = n (n + 1) / 2`` of them), which is what
    :meth:`GeooptManifold.random_base` draws (the symmetric part of ``std * E``, ``E`` a full Gaussian matrix). With
    ``l_i`` the log-eigenvalues of ``X`` (so ``|S|_F^2 = sum l_i^2 = dist(I, X)^2``), the Jacobian of ``exp_I`` in
    eigen-coordinates is ``prod_{i<j} sinh((l_i - l_j) / 2) / ((l_i - l_j) / 2)``, and

        log p = -sum l_i^2 / (2 std^2) - m log(std) - m/2 log(2 pi) - sum_{i<j} log sinhc((l_i - l_j) / 2).

    By affine invariance, the wrapped normal at ``M`` is this density at ``M^-1/2 X M^-1/2``.
    """
    n = x.shape[-1]
    m = n * (n + 1) // 2
    lam = torch.linalg.eigvalsh(x)
    logl = torch.log(lam.clamp_min(torch.finfo(lam.dtype).tiny))
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    gauss = -0.5 * logl.square().sum(-1) / std_t.square() - m * torch.log(std_t) - 0.5 * m * math.log(2 * math.pi)
    iu = torch.triu_indices(n, n, offset=1, device=x.device)
    gaps = (logl[..., iu[0]] - logl[..., iu[1]]) / 2.0
    return gauss - log_sinhc(gaps).sum(-1)


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
        geoopt = import_geoopt()
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
        geoopt = import_geoopt()
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

        SPD matrices (affine-invariant metric): with ``x0 = V diag(s^2) V^T`` and ``x0^-1/2 x1 x0^-1/2 = W diag(e^l)
        W^T``, ``x_t = x0^1/2 W diag(e^{t l}) W^T x0^1/2`` and ``u_t = x0^1/2 W diag(l e^{t l}) W^T x0^1/2`` (two
        symmetric eigendecompositions; the generic construction takes eight: 4x the time on 256 2x2 matrices).
        """
        geoopt = import_geoopt()
        geo = self.manifold
        if isinstance(geo, geoopt.SymmetricPositiveDefinite):
            return self._spd_geodesic(x0, x1, broadcast_time(t, x0))
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

    @staticmethod
    def _spd_geodesic(x0: Tensor, x1: Tensor, tt: Tensor) -> tuple[Tensor, Tensor]:
        """The affine-invariant geodesic of :meth:`geodesic` in closed form (``tt`` broadcasts against ``x0``)."""
        lam, vec = torch.linalg.eigh(x0)
        root = lam.clamp_min(torch.finfo(lam.dtype).tiny).sqrt().unsqueeze(-2)
        half, inv_half = (vec * root) @ vec.transpose(-1, -2), (vec / root) @ vec.transpose(-1, -2)
        inner = inv_half @ x1 @ inv_half
        mu, w = torch.linalg.eigh((inner + inner.transpose(-1, -2)) / 2)
        logmu = torch.log(mu.clamp_min(torch.finfo(mu.dtype).tiny))
        ts = tt[..., 0] if tt.ndim == x0.ndim else tt  # (B, 1): one time per matrix, over its eigenvalues
        grow = torch.exp(ts * logmu)
        x_t = half @ ((w * grow.unsqueeze(-2)) @ w.transpose(-1, -2)) @ half
        u_t = half @ ((w * (logmu * grow).unsqueeze(-2)) @ w.transpose(-1, -2)) @ half
        return (x_t + x_t.transpose(-1, -2)) / 2, (u_t + u_t.transpose(-1, -2)) / 2

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
        geoopt = import_geoopt()
        if isinstance(geo, geoopt.Stereographic):  # exp at the origin in closed form (~3x fewer ops, same values)
            return _plain(geo.expmap0(self.base_std * e)).to(dtype)
        origin = _plain(geo.origin(*e.shape, dtype=cd, device=e.device))
        x = geo.expmap(origin, geo.proju(origin, self.base_std * e))
        return _plain(geo.projx(x)).to(dtype)

    # ------------------------------------------------------------ engine extension points
    @upcast
    def dlogmap(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """``d(log_x)_y [v]``. SPD matrices in closed form (Daleckii-Krein): with ``M = x^-1/2 y x^-1/2 = W diag(mu)
        W^T``, ``x^1/2 W (L o W^T x^-1/2 v x^-1/2 W) W^T x^1/2`` where ``L_ij = (log mu_i - log mu_j) / (mu_i -
        mu_j)`` (``1 / mu_i`` on the diagonal), evaluated as ``log1p(r) / (mu_j r)``, ``r = mu_i / mu_j - 1``, so
        equal eigenvalues (``y`` near ``x``, or a multiple of it) are exact where the forward-mode JVP through
        geoopt's eigendecompositions divides by their gap (NaN at ``y = x`` on torch 2.4). Others: the generic
        forward-mode JVP of :meth:`logmap`."""
        if not self._is_spd():
            return super().dlogmap(x, y, v)
        lam, vec = torch.linalg.eigh(x)
        root = lam.clamp_min(torch.finfo(lam.dtype).tiny).sqrt().unsqueeze(-2)
        half, inv_half = (vec * root) @ vec.transpose(-1, -2), (vec / root) @ vec.transpose(-1, -2)
        inner = inv_half @ y @ inv_half
        mu, w = torch.linalg.eigh((inner + inner.transpose(-1, -2)) / 2)
        mu = mu.clamp_min(torch.finfo(mu.dtype).tiny)
        mu_i, mu_j = mu.unsqueeze(-1), mu.unsqueeze(-2)
        r = mu_i / mu_j - 1.0
        small = r.abs() < 1e-6
        safe = torch.where(small, torch.ones_like(r), r)
        divided = torch.where(small, (1.0 - r / 2.0 + r * r / 3.0) / mu_j, torch.log1p(safe) / (mu_j * safe))
        e = w.transpose(-1, -2) @ (inv_half @ v @ inv_half) @ w
        out = half @ (w @ (divided * e) @ w.transpose(-1, -2)) @ half
        return (out + out.transpose(-1, -2)) / 2

    def _is_poincare(self) -> bool:
        geoopt = import_geoopt()
        return isinstance(self.manifold, geoopt.PoincareBall)

    def orthogonal_proju(self, x: Tensor, u: Tensor) -> Tensor:
        """:meth:`proju` for the geoopt models whose projection is ambient-orthogonal (stereographic charts, SPD,
        spheres, Euclidean); the generic basis construction otherwise (the hyperboloid's Minkowski projection)."""
        geoopt = import_geoopt()
        orthogonal = (geoopt.Stereographic, geoopt.SymmetricPositiveDefinite, geoopt.Sphere, geoopt.Euclidean)
        if isinstance(self.manifold, orthogonal):
            return self.proju(x, u)
        return super().orthogonal_proju(x, u)

    def _is_spd(self) -> bool:
        geoopt = import_geoopt()
        return isinstance(self.manifold, geoopt.SymmetricPositiveDefinite)

    @upcast
    def log_volume_density(self, x: Tensor) -> Tensor:
        """``log sqrt(det g)`` w.r.t. the volume the ambient space induces. Poincare ball: ``d log(2 / (1 - c
        |x|^2))`` (its metric is ``lambda(x)^2`` times the Euclidean one). SPD matrices (affine-invariant metric): the
        metric is the Frobenius product through the self-adjoint map ``U -> X^-1 U X^-1`` of the symmetric matrices,
        whose determinant is ``det(X)^-(n+1)``, so ``-(n + 1)/2 log det X``. Others (the hyperboloid): the generic
        Gram-determinant construction."""
        if self._is_spd():
            n = x.shape[-1]
            logdet = torch.log(torch.linalg.eigvalsh(x).clamp_min(torch.finfo(x.dtype).tiny)).sum(-1)
            return -0.5 * (n + 1) * logdet
        if not self._is_poincare():
            return super().log_volume_density(x)
        c = float(self.manifold.c)
        lam = 2.0 / (1.0 - c * x.square().sum(dim=-1)).clamp_min(torch.finfo(x.dtype).tiny)
        return x.shape[-1] * torch.log(lam)

    @upcast
    def base_log_prob(self, x: Tensor) -> Tensor:
        """The wrapped normal of :meth:`random_base` (std ``base_std`` in the origin's tangent space), w.r.t. the
        Riemannian volume: a Gaussian in Riemannian normal coordinates at the origin over the Jacobian of ``exp_o``.

        - Poincare ball (curvature ``-c``): normal coordinates ``v = lambda_0 log_0(x)`` (``lambda_0 = 2``),
          ``r = |v|``, ``sigma = lambda_0 base_std``: ``log N(v; 0, sigma^2 I_d) - (d - 1) log sinhc(sqrt(c) r)``.
        - Hyperboloid ``<x, x>_L = -k`` (curvature ``-1/k``), origin ``(sqrt k, 0, ..., 0)``: the Minkowski
          projection of ``base_std * e`` at the origin drops ``e_0``, so ``v ~ N(0, base_std^2 I_d)`` in orthonormal
          coordinates and ``log N(v) - (d - 1) log sinhc(r / sqrt k)``, ``r = dist(o, x)``, ``d = x.shape[-1] - 1``.
        - SPD matrices (affine-invariant metric): :func:`spd_wrapped_normal_log_prob`.

        ``sinhc(a) = sinh(a) / a``. Other geoopt models: not implemented (raises, naming the method).
        """
        k = self._lorentz_k()
        if self._is_spd():
            return spd_wrapped_normal_log_prob(x, self.base_std)
        if k is None and not self._is_poincare():
            return super().base_log_prob(x)
        if k is None:
            c = float(self.manifold.c)
            d = x.shape[-1]
            r = 2.0 * torch.linalg.vector_norm(self.logmap(torch.zeros_like(x), x), dim=-1)
            sigma, scaled = 2.0 * self.base_std, math.sqrt(c) * r
        else:
            d = x.shape[-1] - 1
            s = torch.sqrt(k.to(x.dtype))
            origin = torch.zeros_like(x)
            origin[..., 0] = s
            r = self.dist(origin, x)
            sigma, scaled = self.base_std, r / s
        gauss = -0.5 * (r / sigma).square() - d * math.log(sigma) - 0.5 * d * math.log(2 * math.pi)
        return gauss - (d - 1) * log_sinhc(scaled)

    def chart2d(self, x: Tensor) -> Chart2D:
        """The first two coordinates, inside the disk of radius ``1 / sqrt(c)`` for the Poincare ball. SPD matrices:
        two normal coordinates at the identity, ``((log X)_11 - (log X)_22) / sqrt 2`` and ``sqrt 2 (log X)_12``
        (for 2x2 matrices the whole traceless part of ``log X``: the hyperbolic-plane factor of ``SPD(2) = R x H^2``,
        leaving out the log-determinant axis)."""
        if self._is_spd():
            lam, vec = torch.linalg.eigh(x.detach().double())
            logx = (vec * torch.log(lam.clamp_min(1e-300)).unsqueeze(-2)) @ vec.transpose(-1, -2)
            flat = logx.reshape(x.shape[0], *logx.shape[-2:])
            u = (flat[:, 0, 0] - flat[:, 1, 1]) / math.sqrt(2.0)
            v = math.sqrt(2.0) * flat[:, 0, 1]
            return Chart2D(u, v, "(log X11 - log X22) / sqrt 2", "sqrt 2 log X12")
        chart = super().chart2d(x)
        geoopt = import_geoopt()
        if isinstance(self.manifold, geoopt.Lorentz) and x.shape[-1] >= 3:
            # the isometry onto the Poincare ball of the same curvature: x_{1:} / (1 + sqrt(c) x_0), c = 1 / k
            sk = math.sqrt(float(self.manifold.k))
            xd = x.detach().reshape(x.shape[0], -1).double()
            ball = xd[:, 1:3] / (1.0 + xd[:, :1] / sk)
            return Chart2D(ball[:, 0], ball[:, 1], "Poincare disk x1", "Poincare disk x2", disk_radius=sk)
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
