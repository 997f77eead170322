"""ODE integration on manifolds: exp-map Runge-Kutta steppers and torchdiffeq's adaptive methods.

``integrate(velocity, x_init, manifold, ...)`` solves ``dx/dt = P_x v(x, t)`` from ``t0`` to ``t1`` (either
direction), where ``velocity(x, t)`` returns ambient vectors and ``t`` is passed as a ``(B,)`` tensor.

**How the state stays on the manifold: Runge-Kutta in normal coordinates.** Each step from ``x_k`` works in the
chart ``z -> exp_{x_k}(z)`` of the tangent space ``T_{x_k}``. In that chart the ODE reads

    dz/dt = d(log_{x_k})_{y} [ P_y v(y, t) ],     y = exp_{x_k}(z),

an ordinary ODE on the vector space ``T_{x_k}``. A classical explicit RK method is applied to it verbatim, so it
keeps its classical order (1 Euler, 2 Heun and midpoint, 4 RK4) on any manifold with a smooth exp/log near ``x_k``
(this is the Runge-Kutta-Munthe-Kaas idea with ``dexp^{-1}`` computed exactly). Stage ``i`` evaluates the network
at ``y_i = exp_{x_k}(h sum_j a_ij k_j)`` and moves its velocity back to ``T_{x_k}`` by the differential of the
log map (:meth:`Manifold.dlogmap <manifold_fm.manifolds.Manifold.dlogmap>`: closed form on spheres, token
spheres, flat spaces, products of these and SPD matrices; a forward-mode JVP through ``logmap`` by default; no network
cost); the
step ends at
``x_{k+1} = exp_{x_k}(h sum_i b_i k_i)`` followed by ``projx`` (which only removes rounding). The first stage needs no
pull-back (``d log_x`` at ``x`` is the identity on ``T_x``), so Euler is exactly ``x_{k+1} = exp_{x_k}(h P v)``.

``transport`` selects how stage velocities are moved to ``T_{x_k}``: ``"dlog"`` (default, the exact chart map
above: full order), ``"parallel"`` (``manifold.transp``, parallel transport along the geodesic) or ``"project"``
(``proju`` at ``x_k``). These two differ from ``d log`` by ``O(h^2)`` in the stage velocity, which keeps Heun and
midpoint at order 2 but caps RK4 below order 4 on curved manifolds (measured on a rotation of ``S^2``: RK4 converges
at order 4.0 with ``dlog``, 3.0 with ``parallel``, 2.0 with ``project``). ``"ambient"`` is a different scheme:
classical RK on the ambient ODE ``dx/dt = P_x v`` with ``projx`` after every stage (what flow_matching's
``RiemannianODESolver`` does). Its state leaves the manifold between projections, but the ambient flow preserves
the sphere, so it keeps the classical order there (measured: RK4 order 4) with fewer tensor passes per step; use it
for manifolds whose ``projx`` is a retraction (spheres, torus) or that are a full-dimensional chart. Its stage
points return to the manifold through :meth:`Manifold.ambient_retract <manifold_fm.manifolds.Manifold.ambient_retract>`.

**Adaptive methods** (``dopri5``, ``bosh3``, ``fehlberg2``, ``adaptive_heun``, ``dopri8``: anything torchdiffeq
offers) integrate the same chart ODE with torchdiffeq, restarting the chart at every point of the time grid (``steps``
segments, default 8, or ``time_grid``). The state handed to torchdiffeq is the chart coordinate ``z``, so every
network evaluation happens at a point ``exp_{x_k}(z)`` exactly on the manifold, and each segment ends at
``exp_{x_k}(z(t))``. Keep segments short enough that the path stays inside the injectivity radius (``pi R`` on a
sphere) of the segment's start point.

**Network evaluations.** Pass ``stats=IntegrationStats()`` to read ``stats.nfe`` (calls of ``velocity``),
``stats.steps`` (steps or chart segments) and ``stats.method`` afterwards. Fixed steppers cost exactly
``stages * steps`` evaluations (1, 2, 2, 4 per step for euler, heun, midpoint, rk4).

Low-precision inputs: the state is kept in float32; ``velocity`` receives ``x`` in the input dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .manifolds import Manifold
from .manifolds.numerics import compute_dtype

Velocity = Callable[[Tensor, Tensor], Tensor]
# A field returns the tangent velocity at y and an optional per-sample quantity integrated alongside (or None).
Field = Callable[[Tensor, float], tuple[Tensor, Tensor | None]]
Transport = Literal["dlog", "parallel", "project", "ambient"]


@dataclass(frozen=True)
class Tableau:
    """An explicit Butcher tableau: stage times ``c``, coefficients ``a`` (lower triangular), weights ``b``."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int


TABLEAUS: dict[str, Tableau] = {
    "euler": Tableau(c=(0.0,), a=((),), b=(1.0,), order=1),
    "heun": Tableau(c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=2),
    "midpoint": Tableau(c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0), order=2),
    "rk4": Tableau(
        c=(0.0, 0.5, 0.5, 1.0),
        a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
        order=4,
    ),
}
FIXED_METHODS = tuple(TABLEAUS)


def adaptive_methods() -> tuple[str, ...]:
    """Names of the torchdiffeq methods usable as ``method`` (their fixed-grid ones excluded)."""
    from torchdiffeq._impl.odeint import SOLVERS

    fixed = {"euler", "midpoint", "rk4", "heun2", "heun3", "explicit_adams", "implicit_adams", "fixed_adams"}
    return tuple(sorted(k for k in SOLVERS if k not in fixed and k not in TABLEAUS))


@dataclass
class IntegrationStats:
    """Filled in by :func:`integrate` when passed as ``stats``.

    Attributes:
        nfe: number of calls of the velocity (network evaluations).
        steps: fixed-step methods: number of steps; adaptive methods: number of chart segments.
        method: the method used.
        times: the time grid (steps + 1 points).
    """

    nfe: int = 0
    steps: int = 0
    method: str = ""
    times: list[float] = field(default_factory=list)


def pull_back(manifold: Manifold, x: Tensor, y: Tensor, v: Tensor, transport: Transport = "dlog") -> Tensor:
    """Move the tangent vector ``v`` at ``y`` to ``T_x``.

    ``"dlog"``: ``manifold.dlogmap(x, y, v)`` (the velocity of the chart coordinate ``log_x(y)``);
    ``"parallel"``: ``manifold.transp(y, x, v)``; ``"project"``: ``manifold.proju(x, v)``.
    """
    if transport == "dlog":
        return manifold.dlogmap(x, y, v)
    if transport == "parallel":
        return manifold.transp(y, x, v)
    if transport == "project":
        return manifold.proju(x, v)
    raise ValueError(f"unknown transport '{transport}'; choose dlog, parallel or project")


def rk_step(
    fld: Field,
    manifold: Manifold,
    x: Tensor,
    t: float,
    h: float,
    tableau: Tableau,
    transport: Transport = "dlog",
) -> tuple[Tensor, Tensor | None]:
    """One explicit RK step in the normal chart at ``x`` (see the module docstring); returns ``(x_next, extra)``,
    ``extra = h sum_i b_i e_i`` for a field that also returns per-sample quantities ``e_i`` (else ``None``)."""
    if transport == "ambient":
        return _ambient_rk_step(fld, manifold, x, t, h, tableau)
    ks: list[Tensor] = []
    extras: list[Tensor | None] = []
    for i, ci in enumerate(tableau.c):
        if i == 0:
            y = x
        else:
            z = sum((h * aij) * kj for aij, kj in zip(tableau.a[i], ks, strict=False) if aij != 0.0)
            y = manifold.expmap(x, z)
        v, e = fld(y, t + ci * h)
        ks.append(v if i == 0 else pull_back(manifold, x, y, v, transport))
        extras.append(e)
    z = sum((h * bi) * ki for bi, ki in zip(tableau.b, ks, strict=False) if bi != 0.0)
    x_next = manifold.projx(manifold.expmap(x, z))
    if extras[0] is None:
        return x_next, None
    acc = sum((h * bi) * ei for bi, ei in zip(tableau.b, extras, strict=False) if bi != 0.0 and ei is not None)
    return x_next, acc


def _ambient_rk_step(
    fld: Field, manifold: Manifold, x: Tensor, t: float, h: float, tableau: Tableau
) -> tuple[Tensor, Tensor | None]:
    """Classical RK on the ambient ODE ``dx/dt = P_x v(x, t)`` with ``projx`` applied to every stage point and to
    the result (the scheme of flow_matching's ``RiemannianODESolver``). Fewer tensor passes than the chart step;
    for embedded manifolds whose ``projx`` is a retraction (spheres, torus) and full-dimensional charts."""
    retract = manifold.ambient_retract
    ks: list[Tensor] = []
    extras: list[Tensor | None] = []
    for i, ci in enumerate(tableau.c):
        y = (
            x
            if i == 0
            else retract(x + sum((h * aij) * kj for aij, kj in zip(tableau.a[i], ks, strict=False) if aij != 0.0))
        )
        v, e = fld(y, t + ci * h)
        ks.append(v)
        extras.append(e)
    x_next = retract(x + sum((h * bi) * ki for bi, ki in zip(tableau.b, ks, strict=False) if bi != 0.0))
    if extras[0] is None:
        return x_next, None
    acc = sum((h * bi) * ei for bi, ei in zip(tableau.b, extras, strict=False) if bi != 0.0 and ei is not None)
    return x_next, acc


def make_time_grid(
    t0: float, t1: float, steps: int | None, grid: Tensor | Sequence[float] | None, default_steps: int
) -> list[float]:
    """The times a solver visits: ``grid`` (checked monotone) if given, else ``steps`` (or ``default_steps``) uniform
    steps from ``t0`` to ``t1``."""
    if grid is not None:
        grid = [float(v) for v in torch.as_tensor(grid, dtype=torch.float64).flatten()]
        if len(grid) < 2:
            raise ValueError("time_grid needs at least 2 points")
        diffs = [b - a for a, b in zip(grid, grid[1:], strict=False)]
        if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
            raise ValueError("time_grid must be strictly increasing or strictly decreasing")
        return grid
    n = default_steps if steps is None else steps
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if t0 == t1:
        raise ValueError(f"t0 and t1 are both {t0}; nothing to integrate")
    return [t0 + (t1 - t0) * i / n for i in range(n + 1)]


def make_field(velocity: Velocity, manifold: Manifold, in_dtype: torch.dtype, stats: IntegrationStats | None) -> Field:
    """Wrap ``velocity(x, t)`` as a :data:`Field`: ``t`` as a ``(B,)`` tensor, output checked and projected."""

    def fld(y: Tensor, t: float) -> tuple[Tensor, Tensor | None]:
        tb = torch.full((y.shape[0],), t, dtype=y.dtype, device=y.device)
        v = velocity(y.to(in_dtype), tb)
        if stats is not None:
            stats.nfe += 1
        if not torch.is_tensor(v) or v.shape != y.shape:
            got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise ValueError(f"velocity returned {got} for points of shape {tuple(y.shape)}; it must match x")
        return manifold.proju(y, v.to(y.dtype)), None

    return fld


def solve_field(
    fld: Field,
    x_init: Tensor,
    manifold: Manifold,
    grid: list[float],
    method: str,
    transport: Transport = "dlog",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    with_extra: bool = False,
    return_intermediates: bool = False,
) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """Integrate a :data:`Field` over ``grid``; returns ``(x_final, extra_total, trajectory)``."""
    x = x_init
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device) if with_extra else None
    traj = [x] if return_intermediates else []
    tableau = TABLEAUS.get(method)
    for ta, tb in zip(grid, grid[1:], strict=False):
        if tableau is not None:
            x, e = rk_step(fld, manifold, x, ta, tb - ta, tableau, transport)
        else:
            x, e = _adaptive_segment(fld, manifold, x, ta, tb, method, transport, atol, rtol, with_extra)
        if total is not None and e is not None:
            total = total + e
        if return_intermediates:
            traj.append(x)
    return x, total, traj


def _adaptive_segment(
    fld: Field,
    manifold: Manifold,
    xa: Tensor,
    ta: float,
    tb: float,
    method: str,
    transport: Transport,
    atol: float,
    rtol: float,
    with_extra: bool,
) -> tuple[Tensor, Tensor | None]:
    from torchdiffeq import odeint

    def func(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        z = state[0]
        y = manifold.expmap(xa, z)
        v, e = fld(y, float(t))
        k = pull_back(manifold, xa, y, v, transport)
        return k, (e if e is not None else torch.zeros_like(state[1]))

    z0 = torch.zeros_like(xa)
    acc0 = torch.zeros(xa.shape[0], dtype=xa.dtype, device=xa.device)
    times = torch.tensor([ta, tb], dtype=torch.float64 if xa.dtype == torch.float64 else torch.float32)
    try:
        zs, accs = odeint(func, (z0, acc0), times.to(xa.device), method=method, atol=atol, rtol=rtol)
    except AssertionError as exc:  # torchdiffeq signals e.g. underflow in dt with a bare assert
        raise RuntimeError(f"{method} failed between t={ta:g} and t={tb:g}: {exc}") from None
    x_next = manifold.projx(manifold.expmap(xa, zs[-1]))
    return x_next, (accs[-1] if with_extra else None)


def integrate(
    velocity: Velocity,
    x_init: Tensor,
    manifold: Manifold,
    t0: float = 0.0,
    t1: float = 1.0,
    steps: int | None = None,
    method: str = "euler",
    time_grid: Tensor | Sequence[float] | None = None,
    return_intermediates: bool = False,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    transport: Transport = "dlog",
    stats: IntegrationStats | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Solve ``dx/dt = P_x velocity(x, t)`` on ``manifold`` from ``x_init`` at ``t0`` to ``t1``.

    Args:
        velocity: ``velocity(x, t) -> ambient vectors`` with ``t`` a ``(B,)`` tensor; projected by the solver.
        x_init: starting points (on the manifold), any layout the manifold accepts.
        manifold: where the state lives.
        t0, t1: start and end time; ``t0 > t1`` integrates backward (e.g. data -> noise).
        steps: fixed methods: number of uniform steps (default 50); adaptive methods: number of chart segments
            (default 8). Ignored when ``time_grid`` is given.
        method: ``euler``, ``heun``, ``midpoint``, ``rk4`` (exp-map steppers) or a torchdiffeq adaptive method
            (``dopri5``, ``bosh3``, ...).
        time_grid: explicit monotone times (e.g. :func:`manifold_fm.time.shift_time_grid` output); overrides
            ``t0``, ``t1``, ``steps``.
        return_intermediates: also return the states at every grid time, stacked on a new leading axis
            (``len(grid)`` entries, the first being ``x_init``).
        atol, rtol: tolerances of adaptive methods.
        transport: how stage velocities reach the step's base tangent space (module docstring).
        stats: an :class:`IntegrationStats` to fill with the number of network evaluations (``nfe``).

    Returns:
        The final state in ``x_init``'s dtype, or ``(final, trajectory)`` with ``return_intermediates=True``.
    """
    if not torch.is_tensor(x_init) or not x_init.is_floating_point():
        raise ValueError("x_init must be a floating-point tensor")
    if not bool(torch.isfinite(x_init).all()):
        raise ValueError("x_init has NaN/Inf entries")
    adaptive = method not in TABLEAUS
    if adaptive and method not in adaptive_methods():
        raise ValueError(
            f"unknown method '{method}'; choose one of {', '.join(FIXED_METHODS)} or an adaptive torchdiffeq method "
            f"({', '.join(adaptive_methods())})"
        )
    if adaptive and transport == "ambient":
        raise ValueError("transport='ambient' applies to the fixed-step methods (euler, heun, midpoint, rk4)")
    grid = make_time_grid(float(t0), float(t1), steps, time_grid, 8 if adaptive else 50)
    in_dtype = x_init.dtype
    x = x_init.to(compute_dtype(in_dtype))
    if stats is not None:
        stats.nfe, stats.steps, stats.method, stats.times = 0, len(grid) - 1, method, grid
    fld = make_field(velocity, manifold, in_dtype, stats)
    x, _, traj = solve_field(
        fld, x, manifold, grid, method, transport, atol, rtol, return_intermediates=return_intermediates
    )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"integration with {method} produced NaN/Inf; check the velocity field or use more steps / a tighter tol"
        )
    if return_intermediates:
        return x.to(in_dtype), torch.stack(traj).to(in_dtype)
    return x.to(in_dtype)


__all__ = [
    "FIXED_METHODS",
    "TABLEAUS",
    "IntegrationStats",
    "Tableau",
    "adaptive_methods",
    "integrate",
    "make_time_grid",
    "pull_back",
    "rk_step",
    "solve_field",
]
