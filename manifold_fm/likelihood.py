"""Log-likelihood under a learned flow on a manifold, by the change of variables along the ODE.

For the flow ``dx/dt = v(x, t)`` on a manifold ``M`` carrying the prior ``p_0`` at ``t = 0``,

    log p_1(x_1) = log p_0(x_0) - int_0^1 div_M v(x_t, t) dt,

integrated backward from the data point ``x_1`` at ``t = 1`` to ``x_0`` (with any solver of
:mod:`manifold_fm.solvers`; the divergence rides along with the same Runge-Kutta weights).

**The divergence on a manifold.** Write ``V(x) = P_x f(x)`` for the projected network output, defined on the ambient
space around ``M``, ``J`` its ambient Jacobian and ``P_x`` the ambient-orthogonal tangent projection
(:meth:`Manifold.orthogonal_proju <manifold_fm.manifolds.Manifold.orthogonal_proju>`). With respect to the volume the
ambient space induces on ``M`` (for spheres, token spheres, the flat torus, Euclidean space and products of these, the
Riemannian volume) the divergence is the trace of the covariant derivative over an orthonormal tangent basis
``{e_i}``:

    div_M V = sum_i <e_i, J e_i> = tr(P J P) = tr(J P).

Nothing else is subtracted. (Equivalently ``tr J - n^T J n`` with ``n`` the unit normal: for the sphere with the
radial projection ``V = f - <f,x>/<x,x> x`` one has ``<V, x> = 0`` everywhere, hence ``n^T J n = 0`` and the plain
ambient divergence of the projected field equals ``div_M``. We compute ``tr(P J P)``, which needs no such special
structure.) Exact: ``sum_k (P e_k)^T J (P e_k)`` over the ambient basis (one backward pass per ambient coordinate,
for small dimension). Hutchinson: ``E[(P eps)^T J (P eps)] = tr(P J P)`` for ``eps ~ N(0, I)`` (or Rademacher), one
backward pass per probe; the probes are drawn once per call and held fixed along the trajectory.

**Metrics other than the ambient one** (the Poincare ball's ``lambda(x)^2 I``, the hyperboloid's Minkowski metric,
SPD's affine-invariant one): the Riemannian density is ``p_M = p_ambient / sqrt(det g)`` with ``g`` the metric's
Gram matrix on an ambient-orthonormal tangent basis. So

    log p_M(x_1) = log p_M(x_0) + log sqrt(g)(x_0) - log sqrt(g)(x_1) - int tr(P J P) dt,

with ``log sqrt(g)`` from :meth:`Manifold.log_volume_density <manifold_fm.manifolds.Manifold.log_volume_density>`
(0 for the induced metric; ``d log lambda`` on the ball). The prior's density is
:meth:`Manifold.base_log_prob <manifold_fm.manifolds.Manifold.base_log_prob>`.

Densities are with respect to the Riemannian volume of ``M`` (for ``S^2``: area, so the uniform prior has
``log p = -log(4 pi)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .manifolds import Manifold
from .manifolds.numerics import compute_dtype
from .solvers import TABLEAUS, Field, IntegrationStats, Transport, adaptive_methods, make_time_grid, solve_field

Velocity = Callable[[Tensor, Tensor], Tensor]


def _per_sample(values: Tensor, batch: int) -> Tensor:
    """Sum a quantity with the manifold's batch shape (e.g. ``(B, N)`` for ``N`` points per sample) to ``(B,)``."""
    return values.reshape(batch, -1).sum(dim=1)


def base_log_prob(manifold: Manifold, x: Tensor) -> Tensor:
    """``log p_0(x)`` per sample, shape ``(B,)``: :meth:`Manifold.base_log_prob` summed over the points of a sample."""
    return _per_sample(manifold.base_log_prob(x), x.shape[0])


def log_volume_density(manifold: Manifold, x: Tensor) -> Tensor:
    """``log sqrt(det g)`` per sample, shape ``(B,)``: :meth:`Manifold.log_volume_density` summed per sample."""
    return _per_sample(manifold.log_volume_density(x), x.shape[0])


def divergence(
    manifold: Manifold,
    field: Callable[[Tensor], Tensor],
    x: Tensor,
    method: Literal["exact", "hutchinson"] = "exact",
    probes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(V, div_M V)`` at ``x`` for the projected field ``V = P_x field(x)``: ``tr(P J P)``, shape ``(B,)``, with
    ``P`` the ambient-orthogonal tangent projection (:meth:`~manifold_fm.manifolds.Manifold.orthogonal_proju`).

    ``method="exact"`` sums over the ambient basis; ``"hutchinson"`` averages ``(P eps)^T J (P eps)`` over
    ``probes`` (shape ``(K, *x.shape)``).
    """
    batch = x.shape[0]
    with torch.enable_grad():
        xx = x.detach().requires_grad_(True)
        V = manifold.proju(xx, field(xx))
        if method == "exact":
            n = xx[0].numel()
            eye = torch.eye(n, dtype=x.dtype, device=x.device)
            directions = [eye[k].reshape(1, *x.shape[1:]).expand_as(x) for k in range(n)]
        elif method == "hutchinson":
            if probes is None:
                raise ValueError("Hutchinson divergence needs probes")
            directions = list(probes)
        else:
            raise ValueError(f"unknown divergence method '{method}'; choose exact or hutchinson")
        total = torch.zeros(batch, dtype=x.dtype, device=x.device)
        if not V.requires_grad:  # a field that ignores x (e.g. constant zero) has zero divergence
            return V.detach(), total
        for i, e in enumerate(directions):
            w = manifold.orthogonal_proju(x, e).detach()
            (g,) = torch.autograd.grad(V, xx, grad_outputs=w, retain_graph=i < len(directions) - 1)
            total = total + (g * w).reshape(batch, -1).sum(dim=1)
        if method == "hutchinson":
            total = total / len(directions)
    return V.detach(), total.detach()


def log_likelihood(
    velocity: Velocity,
    x1: Tensor,
    manifold: Manifold,
    steps: int | None = None,
    method: str = "rk4",
    divergence_method: Literal["exact", "hutchinson"] = "exact",
    probes: int = 1,
    noise: Literal["gaussian", "rademacher"] = "gaussian",
    generator: torch.Generator | None = None,
    base_log_prob_fn: Callable[[Tensor], Tensor] | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    transport: Transport = "dlog",
    return_base: bool = False,
    stats: IntegrationStats | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``log p_1(x1)`` (shape ``(B,)``) under the flow of ``velocity`` started from the prior at ``t0``.

    Args:
        velocity: ``velocity(x, t)`` (``t`` a ``(B,)`` tensor), differentiable in ``x``.
        x1: points on ``manifold`` (data side, time ``t1``).
        steps, method, atol, rtol, transport: solver settings (:func:`manifold_fm.solvers.integrate`); default
            ``rk4`` with 50 steps.
        divergence_method: ``"exact"`` (small dimension) or ``"hutchinson"`` (large), with ``probes`` probes of
            ``noise`` type drawn from ``generator``.
        base_log_prob_fn: the prior's log density per sample; default ``manifold.base_log_prob`` summed per
            sample (:func:`base_log_prob`).
        return_base: also return the base points ``x0`` reached at ``t0``.
        stats: filled with the number of velocity evaluations (exact divergence: one forward and ``n`` backward
            passes per evaluation).
    """
    in_dtype = x1.dtype
    x = x1.detach().to(compute_dtype(in_dtype))
    adaptive = method not in TABLEAUS
    if adaptive and method not in adaptive_methods():
        raise ValueError(f"unknown method '{method}'")
    grid = make_time_grid(float(t1), float(t0), steps, None, 8 if adaptive else 50)
    if stats is not None:
        stats.nfe, stats.steps, stats.method, stats.times = 0, len(grid) - 1, method, grid
    eps: Tensor | None = None
    if divergence_method == "hutchinson":
        shape = (probes, *x.shape)
        if noise == "gaussian":
            eps = torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
        elif noise == "rademacher":
            eps = torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
        else:
            raise ValueError(f"unknown probe noise '{noise}'; choose gaussian or rademacher")

    def fld(y: Tensor, t: float) -> tuple[Tensor, Tensor]:
        tb = torch.full((y.shape[0],), t, dtype=y.dtype, device=y.device)

        def f(z: Tensor) -> Tensor:
            out = velocity(z.to(in_dtype), tb)
            if out.shape != z.shape:
                raise ValueError(f"velocity returned shape {tuple(out.shape)} for points of shape {tuple(z.shape)}")
            return out.to(z.dtype)

        if stats is not None:
            stats.nfe += 1
        return divergence(manifold, f, y, divergence_method, eps)

    field: Field = fld
    x0, total, _ = solve_field(field, x, manifold, grid, method, transport, atol, rtol, with_extra=True)
    assert total is not None
    prior = (base_log_prob_fn or (lambda z: base_log_prob(manifold, z)))(x0)
    logp = prior + total + log_volume_density(manifold, x0) - log_volume_density(manifold, x)
    return (logp, x0.to(in_dtype)) if return_base else logp


__all__ = ["base_log_prob", "divergence", "log_likelihood", "log_volume_density"]
