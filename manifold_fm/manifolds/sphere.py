"""Spheres: :class:`Sphere` (one sphere on the last axis) and :class:`TokenSpheres` (a product of per-token spheres).

Everything is computed along one *sphere axis* with ``keepdim`` reductions, so a ``(B, C, H, W)`` latent with
``axis=1`` is ``H*W`` independent spheres ``S^{C-1}(R)`` per sample without any reshaping.

Accuracy. Angles never come from ``acos`` of a dot product. For points ``x, y`` let ``m = sign<x, y>`` and
``v = y - m x`` (``y - x`` for acute pairs, ``y + x`` for obtuse ones, ``y`` for exactly orthogonal ones: exact
float subtractions by Sterbenz's lemma where they matter, near 0 and near pi). Then ``y`` has tangential part
``y_perp = v - (<v, x>/<x, x>) x`` and parallel part ``<y, x>/|x| = <v, x>/|x| + m |x|``, and

    angle(x, y) = atan2(|y_perp|, <v, x>/|x| + m |x|),

the exact angle between the two vectors whatever their norms, accurate to a few ulps from 1e-6 rad to pi.

Degenerate cases (one policy each, tested):
- identical points: angle 0, ``logmap = 0``, the geodesic is constant with zero velocity;
- antipodal points (``y_perp == 0`` and ``<x, y> < 0``): the geodesic is not unique; we take the great circle
  through the tangent direction obtained by projecting the coordinate axis ``e_k`` on which ``|x_k|`` is smallest
  (deterministic, never degenerate); ``logmap`` has norm ``pi R``;
- zero tangent vector: ``expmap(x, 0) = x`` with finite gradients (``sinc`` form);
- zero-norm input to ``projx``: mapped to ``R e_0`` (the first coordinate axis), with zero gradient.

Low precision: float16/bfloat16 inputs are computed in float32 and returned in the input dtype.

Speed: these ops are memory-bound, and on CPU a fresh full-size temporary costs more than the arithmetic on it
(page faults). Without autograd, ``geodesic``, ``expmap``, ``logmap``, ``angle`` and ``dist`` therefore reuse one
scratch tensor for all their dot products and build their outputs in place (two allocations per geodesic); with
autograd the same formulas run out of place. ``benchmarks/README.md`` has the measurements (token geodesic ~1.8-2x a
linear interpolation on a 2-core CPU). ``Sphere(..., compile=True)`` / ``TokenSpheres(..., compile=True)`` route
``geodesic`` through ``torch.compile``: opt-in for GPU users; on CPU it measured slower than eager.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .base import Chart2D, Manifold, ManifoldError
from .numerics import angle_over_sine, branch_on_host, broadcast_time, dlog_series, safe_sqrt, sinc, upcast


def _reuse_buffers(x: Tensor, *others: Tensor) -> bool:
    """Whether an op may build its results in scratch tensors shaped like ``x``: autograd does not record it, and
    the other inputs neither broadcast ``x`` to a larger shape nor promote its dtype."""
    if torch.is_grad_enabled() and (x.requires_grad or any(a.requires_grad for a in others)):
        return False
    # Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) has no formulas for the in-place out= kernels.
    if any(fwAD.unpack_dual(a).tangent is not None for a in (x, *others)):
        return False
    if any(a.dtype != x.dtype for a in others):
        return False
    return x.shape == torch.broadcast_shapes(x.shape, *(a.shape for a in others))


# Elements materialised at once by the pairwise cost (tokens x pairs).
_COST_CHUNK = 1 << 23


class _Pair(NamedTuple):
    """Per-token quantities of an ordered pair ``(x, y)``; reductions have a kept size-1 sphere axis."""

    v: Tensor  # y - m x, full shape
    nx: Tensor  # |x|
    c: Tensor  # <v, x> / <x, x>: y_perp = v - c x
    s: Tensor  # |y_perp| (before the antipodal fallback)
    w: Tensor  # angle(x, y) in [0, pi]
    ratio: Tensor  # w / s, finite everywhere


class Sphere(Manifold):
    """The sphere ``S^{n-1}(R) = {x in R^n : |x| = R}`` on the last axis of a tensor ``(..., n)``.

    Metric: the one induced by the ambient Euclidean space, so ``dist(x, y) = R * angle(x, y)``.
    """

    name = "sphere"
    point_ndim: int | None = 1

    def __init__(self, radius: float = 1.0, compile: bool = False) -> None:
        if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
            raise ValueError(f"Sphere radius must be a finite positive number, got {radius!r}")
        self.radius = float(radius)
        self.axis = -1
        # Opt-in: run geodesic() through torch.compile (a fused kernel); eager stays the tested default.
        self.compile = bool(compile)
        self._compiled: Callable[..., tuple[Tensor, Tensor]] | None = None

    def __repr__(self) -> str:
        return f"Sphere(radius={self.radius:g})"

    # ------------------------------------------------------------ helpers
    def _dot(self, a: Tensor, b: Tensor) -> Tensor:
        # vecdot fuses the product into the reduction (no full-size temporary): ~25% faster than (a*b).sum on CPU.
        if a.dtype != b.dtype:  # vecdot does not promote; mixed inputs take the promoting product
            return (a * b).sum(dim=self.axis, keepdim=True)
        return torch.linalg.vecdot(a, b, dim=self.axis).unsqueeze(self.axis)

    def _check_axis(self, x: Tensor) -> None:
        if x.ndim == 0:
            raise ManifoldError(f"{self.name}: expected a tensor with a sphere axis, got a scalar")

    def _tokens_to_points(self, per_token: Tensor, like: Tensor) -> Tensor:
        """Reduce a keepdim per-token tensor to the batch shape (Sphere: drop the sphere axis)."""
        return per_token.squeeze(self.axis)

    def _fallback_direction(self, x: Tensor) -> Tensor:
        """A unit tangent vector at ``x``: the coordinate axis where ``|x_k|`` is smallest, projected and normalised."""
        k = x.abs().argmin(dim=self.axis, keepdim=True)
        e = torch.zeros_like(x).scatter_(self.axis, k, 1.0)
        xx = self._dot(x, x)
        e = e - self._dot(e, x) / xx * x
        return e / self._dot(e, e).sqrt()

    def _pair(self, x: Tensor, y: Tensor, scratch: Tensor | None = None) -> _Pair:
        """Per-token quantities of ``(x, y)``. With a ``scratch`` tensor shaped like ``x`` the four dot products
        reuse it for their elementwise products instead of allocating four temporaries (no-autograd path only)."""
        if scratch is None:
            dot = self._dot
        else:

            def dot(a: Tensor, b: Tensor) -> Tensor:
                return torch.mul(a, b, out=scratch).sum(dim=self.axis, keepdim=True)

        xy = dot(x, y)
        # sign<x, y> (0 for orthogonal pairs, where v = y is as good as either choice).
        m = torch.sign(xy)
        v = torch.addcmul(y, m, x, value=-1.0)
        xx = dot(x, x)
        vx = dot(v, x)
        vv = dot(v, v)
        nx = xx.sqrt()
        c = vx / xx
        # |v_perp|^2 = |v|^2 - <v,x>^2/|x|^2; clamp the rounding-level negative values of near-parallel pairs.
        s = safe_sqrt(vv - vx * c)
        par = vx / nx + m * nx
        w = torch.atan2(s, par)
        return _Pair(v=v, nx=nx, c=c, s=s, w=w, ratio=angle_over_sine(w, s, par))

    def _direction_terms(self, x: Tensor, p: _Pair) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(v, c, w, ratio)`` with the antipodal fallback applied: ``y_perp/s = (v - c x) * ratio / w``."""
        antipodal = (p.s <= torch.finfo(x.dtype).tiny) & (p.w > 1.0)
        # Skip the antipodal fallback when no token needs it where that read is free; else blend it in (adding zeros).
        if branch_on_host(x) and not bool(antipodal.any()):
            return p.v, p.c, p.w, p.ratio
        # Replace the (zero) tangential part by R times a deterministic unit tangent direction.
        e = self._fallback_direction(x)
        v = p.v + antipodal * (p.nx * e)
        w = torch.where(antipodal, torch.full_like(p.w, math.pi), p.w)
        ratio = torch.where(antipodal, math.pi / p.nx, p.ratio)
        return v, p.c, w, ratio

    # ------------------------------------------------------------ geometry
    @upcast
    def projx(self, x: Tensor) -> Tensor:
        """``R x / |x|`` per token; zero-norm tokens map to ``R e_0``. Scale-safe for tiny and huge inputs."""
        self._check_axis(x)
        scale = x.abs().amax(dim=self.axis, keepdim=True)
        zero = scale == 0
        y = x / torch.where(zero, torch.ones_like(scale), scale)
        e0 = torch.zeros_like(x).narrow(self.axis, 0, 1).fill_(1.0)
        e0 = torch.cat([e0, torch.zeros_like(x).narrow(self.axis, 1, x.shape[self.axis] - 1)], dim=self.axis)
        y = torch.where(zero, e0, y)
        return y * (self.radius / self._dot(y, y).sqrt())

    @upcast
    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        """``u - <u, x>/<x, x> x`` per token."""
        xx = self._dot(x, x).clamp_min(torch.finfo(x.dtype).tiny)
        return u - self._dot(u, x) / xx * x

    @upcast
    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        """``cos(|u|/R) x + sinc(|u|/R) u`` per token, renormalised to radius ``R`` (so chains do not drift)."""
        if not _reuse_buffers(x, u):
            theta = safe_sqrt(self._dot(u, u)) / self.radius
            y = torch.mul(x, torch.cos(theta)).addcmul_(sinc(theta), u)  # two passes, one allocation
            return y * (self.radius / safe_sqrt(self._dot(y, y)).clamp_min(torch.finfo(y.dtype).tiny))
        # No autograd: one scratch tensor for both dot products and in-place scaling (see _geodesic).
        scratch = torch.empty_like(x)
        theta = safe_sqrt(torch.mul(u, u, out=scratch).sum(dim=self.axis, keepdim=True)) / self.radius
        y = torch.mul(x, torch.cos(theta)).addcmul_(sinc(theta), u)
        yy = torch.mul(y, y, out=scratch).sum(dim=self.axis, keepdim=True)
        return y.mul_(self.radius / safe_sqrt(yy).clamp_min(torch.finfo(y.dtype).tiny))

    @upcast
    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        """``R * angle * y_perp / |y_perp|`` per token (zero for identical points; antipodal policy above)."""
        if not _reuse_buffers(x, y):
            v, c, _, ratio = self._direction_terms(x, self._pair(x, y))
            return torch.addcmul(v, c, x, value=-1.0).mul_(self.radius * ratio)
        # No autograd: reuse a scratch tensor for the dot products and build the result in v (our own temporary).
        v, c, _, ratio = self._direction_terms(x, self._pair(x, y, torch.empty_like(x)))
        return v.addcmul_(c, x, value=-1.0).mul_(self.radius * ratio)

    @upcast
    def angle(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-token angle in ``[0, pi]`` with a kept size-1 sphere axis."""
        return self._pair(x, y, self._scratch(x, y)).w

    @upcast
    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        """Geodesic distance ``R * angle(x, y)`` (for token spheres: the product metric over tokens)."""
        return self._points_norm(self.radius * self._pair(x, y, self._scratch(x, y)).w, x)

    @staticmethod
    def _scratch(x: Tensor, y: Tensor) -> Tensor | None:
        """A reusable product buffer for :meth:`_pair`'s dot products, unless autograd or broadcasting forbid it."""
        return torch.empty_like(x) if _reuse_buffers(x, y) else None

    def _points_norm(self, per_token: Tensor, like: Tensor) -> Tensor:
        return self._tokens_to_points(per_token, like)

    @upcast
    def geodesic(self, x0: Tensor, x1: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """Closed-form slerp per token.

        With ``x0_hat = x0/|x0|``, unit tangent ``e = y_perp/|y_perp|`` and angle ``w``:
        ``x_t = R (cos(t w) x0_hat + sin(t w) e)`` and ``u_t = R w (cos(t w) e - sin(t w) x0_hat)``, i.e. the
        SFM target ``w (cos(t w) x1 - cos((1-t) w) x0) / sin w`` without its ``0/0`` at ``w -> 0`` or ``pi``.
        Both are evaluated as ``a x0 + b v`` with per-token scalars and ``v = x1 - sign<x0,x1> x0`` (exact near 0
        and near pi), so the accuracy of :meth:`angle` carries over; the antipodal policy applies.

        Cost (eager, memory-bound): one pass for ``v``, four fused dot products, two passes per output. A variant
        working from ``d = x1 - x0`` alone saves one dot product but loses ~20x accuracy near 154 degrees and needs
        the exact path anyway for near-antipodal tokens (common for 4-channel latents); measured not worth it.
        """
        tt = broadcast_time(t, x0)
        if self.compile:
            return self._compiled_geodesic()(x0, x1, tt)
        return self._geodesic(x0, x1, tt)

    def _geodesic(self, x0: Tensor, x1: Tensor, tt: Tensor) -> tuple[Tensor, Tensor]:
        if not _reuse_buffers(x0, x1, tt):
            p = self._pair(x0, x1)
            v, c, w, ratio = self._direction_terms(x0, p)
            return self._slerp_outputs(x0, v, tt, p.nx, c, w, ratio)
        # No autograd (training targets, sampling): fresh full-size tensors cost page faults that dominate this
        # memory-bound op on CPU, so allocate two (scratch, v) and build x_t and u_t in them, in place.
        scratch = torch.empty_like(x0)
        p = self._pair(x0, x1, scratch)
        v, c, w, ratio = self._direction_terms(x0, p)
        return self._slerp_outputs(x0, v, tt, p.nx, c, w, ratio, out_x=scratch, reuse_v=True)

    def _compiled_geodesic(self) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]:
        """The geodesic under ``torch.compile``, built on first use (two fused graphs around the host-side antipodal
        test; compiling takes a while on a small CPU). A branch-free variant that always blends the antipodal fallback
        in was slower compiled on CPU, so the branch stays."""
        if self._compiled is None:
            self._compiled = torch.compile(self._geodesic, dynamic=False)
        return self._compiled

    def _slerp_outputs(
        self,
        x0: Tensor,
        v: Tensor,
        tt: Tensor,
        nx: Tensor,
        c: Tensor,
        w: Tensor,
        ratio: Tensor,
        out_x: Tensor | None = None,
        reuse_v: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """``x_t = a_x x0 + k v`` and ``u_t = a_u x0 + r v``, given ``y_perp = v - c x0``, ``ratio = w/|y_perp|``."""
        R = self.radius
        tw = tt * w
        cos_tw, sin_tw = torch.cos(tw), torch.sin(tw)
        r_nx = R / nx
        k = (R * tt) * ratio * sinc(tw)  # R sin(t w) / s
        a_x = cos_tw * r_nx - k * c
        r = (R * ratio) * cos_tw  # R w cos(t w) / s
        a_u = torch.addcmul(r * c, w * sin_tw, r_nx).neg_()  # -(R w sin(t w) / |x0| + r c)
        # In-place accumulation: one allocation and two passes per output (eager CPU is memory-bound here).
        x_t = torch.mul(x0, a_x, out=out_x).addcmul_(k, v) if out_x is not None else torch.mul(x0, a_x).addcmul_(k, v)
        # u_t last: with reuse_v it overwrites v (the caller's own temporary), which x_t no longer needs.
        u_t = v.mul_(r).addcmul_(a_u, x0) if reuse_v else torch.mul(x0, a_u).addcmul_(r, v)
        return x_t, u_t

    @upcast
    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """Parallel transport of ``v`` from ``x`` to ``y`` along their geodesic.

        With unit direction ``e`` and angle ``w``: ``v + <e, v> ((cos w - 1) e - sin w x_hat)``; the part of ``v``
        orthogonal to ``e`` and ``x`` is unchanged. An isometry ``T_x -> T_y``.
        """
        p = self._pair(x, y)
        vv, c, w, ratio = self._direction_terms(x, p)
        # e = (vv - c x) * ratio / w; write ratio/w as 1/s (with s = R for the antipodal fallback).
        inv_s = torch.where(w > 0, ratio / torch.where(w > 0, w, torch.ones_like(w)), torch.zeros_like(w))
        e = (vv - c * x) * inv_s
        xhat = x / p.nx
        ev = self._dot(e, v)
        return v + ev * ((torch.cos(w) - 1.0) * e - torch.sin(w) * xhat)

    def random_base(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Uniform samples: the radial projection ``R e/|e|`` of standard Gaussians ``e`` of the given shape."""
        dtype = dtype or torch.get_default_dtype()
        e = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
        return self.projx(e)

    # ------------------------------------------------------------ engine extension points
    @upcast
    def dlogmap(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """Closed-form ``d(log_x)_y [v]`` per token. With ``w`` the angle between ``x`` and ``y``,
        ``y_perp = P_x y`` and ``log_x y = (w / sin w) y_perp``:

            d(log_x)_y [v] = (w / sin w) P_x v - g(w) <x, v> y_perp / R^2,   g(w) = (sin w - w cos w) / sin^3 w,

        (``g(0) = 1/3``; singular only at the cut locus ``w = pi``). Equal to the forward-mode JVP of :meth:`logmap`
        (tested) at a fraction of its cost.
        """
        ax = self.axis
        w = self.angle(x, y)
        xx = (x * x).sum(dim=ax, keepdim=True)
        xv = (x * v).sum(dim=ax, keepdim=True)
        y_perp = self.proju(x, y)
        f = 1.0 / torch.sinc(w / math.pi)
        return f * (v - xv / xx * x) - (dlog_series(w) * xv / xx) * y_perp

    def ambient_retract(self, y: Tensor) -> Tensor:
        """``R y / |y|`` per token: :meth:`projx` without its zero-norm policy, which cannot trigger for
        ``y = x + h k`` with ``k`` tangent at ``x`` (``|y| >= |x| = R``); one pass instead of projx's scale-safe
        three."""
        return y * (self.radius * torch.rsqrt((y * y).sum(dim=self.axis, keepdim=True)))

    def orthogonal_proju(self, x: Tensor, u: Tensor) -> Tensor:
        """:meth:`proju` (already the ambient-orthogonal projection)."""
        return self.proju(x, u)

    def log_volume_density(self, x: Tensor) -> Tensor:
        """0: the metric is the one the ambient space induces."""
        return self._tokens_to_points(torch.zeros_like(x.narrow(self.axis, 0, 1)), x)

    def base_log_prob(self, x: Tensor) -> Tensor:
        """Uniform: ``-log(2 pi^{n/2} R^{n-1} / Gamma(n/2))`` per token (minus the log of the sphere's area), summed
        over the tokens of a point."""
        n = x.shape[self.axis]
        log_area = math.log(2.0) + 0.5 * n * math.log(math.pi) - math.lgamma(0.5 * n) + (n - 1) * math.log(self.radius)
        return self._tokens_to_points(torch.full_like(x.narrow(self.axis, 0, 1), -log_area), x)

    def pairwise_sq_dist(self, x0: Tensor, x1: Tensor) -> Tensor:
        """Squared geodesic cost summed over tokens from batched dot products: per token
        ``angle = atan2(sqrt(|a|^2 |b|^2 - <a, b>^2), <a, b>)`` (one ``bmm`` over tokens instead of elementwise pairs),
        ``C = R^2 sum_tokens angle^2``. The Lagrange-identity form loses relative accuracy for angles below ~1e-3 rad
        in float32 (absolute error stays ~1e-4 rad): irrelevant for ranking transport costs, so used only here."""
        if x0.ndim < 2:
            return super().pairwise_sq_dist(x0, x1)
        ax = self.axis % x0.ndim
        a = x0.movedim(ax, -1).reshape(x0.shape[0], -1, x0.shape[ax]).transpose(0, 1)  # (T, B0, C)
        b = x1.movedim(ax, -1).reshape(x1.shape[0], -1, x1.shape[ax]).transpose(0, 1)  # (T, B1, C)
        na, nb = (a * a).sum(-1), (b * b).sum(-1)
        n0, n1, tokens = a.shape[1], b.shape[1], a.shape[0]
        out = torch.empty(n0, n1, dtype=x0.dtype, device=x0.device)
        rows = max(1, _COST_CHUNK // max(1, tokens * n1))
        for i in range(0, n0, rows):
            d = torch.bmm(a[:, i : i + rows], b.transpose(1, 2))  # (T, r, B1)
            cross = (na[:, i : i + rows, None] * nb[:, None, :] - d * d).clamp_min(0.0).sqrt()
            out[i : i + rows] = torch.atan2(cross, d).square().sum(0)
        return out * self.radius**2

    def chart2d(self, x: Tensor) -> Chart2D:
        """Longitude and latitude of the first token when the spheres are ``S^2``; else the base class's chart."""
        n = x.shape[self.axis]
        if n != 3:
            return super().chart2d(x)
        v = x.detach().movedim(self.axis, -1).reshape(x.shape[0], -1, 3)[:, 0].double()
        v = v / v.norm(dim=-1, keepdim=True)
        return Chart2D(torch.atan2(v[:, 1], v[:, 0]), torch.asin(v[:, 2].clamp(-1, 1)), "longitude", "latitude")

    def point_error(self, x: Tensor) -> Tensor:
        """``| |x| - R | / R`` per token, maximised over the tokens of each point."""
        xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        err = (self._dot(xc, xc).sqrt() / self.radius - 1.0).abs()
        return self._max_over_point(err, x)

    def vector_error(self, x: Tensor, u: Tensor) -> Tensor:
        """``|<u, x>| / (|u| |x|)`` per token (the cosine to the normal), maximised over tokens."""
        xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        uc = u.float() if u.dtype in (torch.float16, torch.bfloat16) else u
        tiny = torch.finfo(xc.dtype).tiny
        cos = self._dot(uc, xc).abs() / (self._dot(uc, uc).sqrt() * self._dot(xc, xc).sqrt()).clamp_min(tiny)
        return self._max_over_point(cos, x)

    def _max_over_point(self, per_token: Tensor, like: Tensor) -> Tensor:
        return per_token.squeeze(self.axis)


class TokenSpheres(Sphere):
    """The product of per-token spheres ``S^{d-1}(R)``, ``R = sqrt(d)`` by default, over any tensor layout.

    ``axis`` names the channel (sphere) axis: ``axis=1`` for ``(B, C, H, W)`` latents, ``axis=-1`` for ``(B, N, D)``
    token sequences. Every other position is an independent token; one *point* is a whole sample (all axes but the
    leading batch axis), so ``inner``, ``norm`` and ``dist`` return shape ``(B,)`` with the product metric
    ``dist(x, y)^2 = sum_tokens (R * angle)^2``. Per-token angles are available from :meth:`angle`.
    """

    name = "token_spheres"
    point_ndim = None

    def __init__(self, dim: int, axis: int = 1, radius: float | None = None, compile: bool = False) -> None:
        if not (isinstance(dim, int) and dim >= 2):
            raise ValueError(f"TokenSpheres dim must be an integer >= 2 (channels per token), got {dim!r}")
        super().__init__(math.sqrt(dim) if radius is None else radius, compile=compile)
        self.dim = dim
        self.axis = axis

    def __repr__(self) -> str:
        return f"TokenSpheres(dim={self.dim}, axis={self.axis}, radius={self.radius:g})"

    def _check_axis(self, x: Tensor) -> None:
        if x.ndim < 2:
            raise ManifoldError(f"{self.name}: expected a batch with a token axis, got shape {tuple(x.shape)}")
        if x.shape[self.axis] != self.dim:
            raise ManifoldError(
                f"{self.name}: axis {self.axis} has size {x.shape[self.axis]} but the tokens have dim={self.dim}; "
                "pass the right axis (1 for (B, C, H, W), -1 for (B, N, D)) or dim"
            )

    def _tokens_to_points(self, per_token: Tensor, like: Tensor) -> Tensor:
        return per_token.sum(dim=self.point_dims(like))

    def _points_norm(self, per_token: Tensor, like: Tensor) -> Tensor:
        return torch.linalg.vector_norm(per_token, dim=self.point_dims(like))

    def _max_over_point(self, per_token: Tensor, like: Tensor) -> Tensor:
        return per_token.amax(dim=self.point_dims(like))

    def token_norms(self, x: Tensor) -> Tensor:
        """Per-token Euclidean norms with a kept size-1 channel axis."""
        return torch.linalg.vector_norm(x, dim=self.axis, keepdim=True)
