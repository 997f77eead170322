"""Reusable checks of the :class:`~manifold_fm.manifolds.Manifold` contract, for built-in and user manifolds.

:func:`check_manifold` runs every check on a batch of point pairs and raises :class:`AssertionError` with a one-line
message naming the property that failed (``"exp(log) = id: ..."``). The single ``check_*`` functions are the same
checks with explicit inputs and tolerances; the library's own contract suite (``tests/test_manifold_contract.py``)
calls them on hypothesis-drawn batches. Every identity is checked against something computed independently of the
tested method: a round trip, a symmetry, the distance, or a float64 central finite difference of the geodesic's own
points.

Tolerances are absolute and compared with the maximum error over the whole batch (``max |actual - expected|``).

"On the manifold" and "tangent" are judged by the manifold's own ``check_point``/``check_vector``, i.e. by its
``point_error``/``vector_error``. Their defaults measure the distance to ``projx``/``proju``, so a wrong projection
would pass its own test: a manifold with a defining equation (``|x| = R``, ``<x, u> = 0``) should override them with
it, as the built-in spheres do.

For float32 accuracy studies of angles, :func:`angle_pairs` draws pairs at an exact angle and :func:`exact_angle`
is the float64 reference (the half-angle formula on normalised vectors, a different algorithm from the library's
``atan2`` of tangential and parallel parts).

Pure tensor math: importing this module imports no test framework.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .base import Manifold, ManifoldError

__all__ = [
    "angle_pairs",
    "assert_close",
    "check_dist",
    "check_exp_log",
    "check_geodesic_endpoints",
    "check_geodesic_finite_difference",
    "check_geodesic_velocity",
    "check_log_exp",
    "check_manifold",
    "check_proju",
    "check_projx",
    "check_transp",
    "exact_angle",
]

Diff = Callable[[Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------------------------- angle accuracy
def angle_pairs(
    theta: float,
    n: int,
    dim: int,
    radius: float = 1.0,
    seed: int = 0,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``n`` float32 pairs ``(x, y)`` of shape ``(n, dim)`` on the sphere of ``radius``, at angle ``theta``.

    Built in float64 as ``x = R a``, ``y = R (cos(theta) a + sin(theta) e)`` with unit ``a`` and a unit ``e``
    orthogonal to it, then rounded to float32 (so the angle between the float32 vectors is ``theta`` only up to
    rounding: compare against :func:`exact_angle` of the returned tensors, not against ``theta``).
    ``generator`` (if given) is used instead of a fresh one seeded with ``seed``.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    a = torch.randn(n, dim, generator=g, dtype=torch.float64)
    a = a / a.norm(dim=-1, keepdim=True)
    e = torch.randn(n, dim, generator=g, dtype=torch.float64)
    e = e - (e * a).sum(-1, keepdim=True) * a
    e = e / e.norm(dim=-1, keepdim=True)
    b = math.cos(theta) * a + math.sin(theta) * e
    return (radius * a).float(), (radius * b).float()


def exact_angle(x: Tensor, y: Tensor) -> Tensor:
    """The angle between ``x`` and ``y`` over the last axis, in float64: ``2 atan2(|x^ - y^|, |x^ + y^|)``.

    ``x^ = x / |x|``; both are upcast to float64 first, so this is the exact angle between the given (e.g. float32)
    vectors up to float64 rounding, for every angle in ``[0, pi]``.
    """
    x, y = x.double(), y.double()
    xh, yh = x / x.norm(dim=-1, keepdim=True), y / y.norm(dim=-1, keepdim=True)
    return 2 * torch.atan2((xh - yh).norm(dim=-1), (xh + yh).norm(dim=-1))


# -------------------------------------------------------------------------------------------------- primitives
def assert_close(actual: Tensor, expected: Tensor, atol: float, what: str) -> None:
    """Raise ``AssertionError("<what>: ...")`` unless shapes match and ``max |actual - expected| <= atol``.

    The difference is taken in float64, so the comparison itself adds no rounding.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    err = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
    if not err <= atol:  # also catches NaN
        raise AssertionError(f"{what}: max abs error {err:.3g} > {atol:.3g}")


def _on_manifold(prop: str, m: Manifold, x: Tensor, u: Tensor | None = None) -> None:
    """``m.check_point(x)`` (or ``m.check_vector(x, u)``) with its :class:`ManifoldError` turned into an
    ``AssertionError`` that names the property under test."""
    try:
        if u is None:
            m.check_point(x)
        else:
            m.check_vector(x, u)
    except ManifoldError as exc:
        raise AssertionError(f"{prop}: {exc}") from exc


def _batch_shape(m: Manifold, x: Tensor) -> tuple[int, ...]:
    """The shape of ``x`` without its point axes (the shape of ``inner``, ``dist``, per-sample ``t``)."""
    dims = set(m.point_dims(x))
    return tuple(s for i, s in enumerate(x.shape) if i not in dims)


def _batch_view(v: Tensor, like: Tensor, m: Manifold) -> Tensor:
    """Reshape a batch-shaped scalar so it broadcasts against ``like`` over its (trailing) point axes."""
    return v.reshape(*v.shape, *([1] * len(m.point_dims(like))))


# ------------------------------------------------------------------------------------------------------ checks
def check_projx(m: Manifold, x: Tensor, a: Tensor, atol: float) -> None:
    """``projx`` lands on the manifold and is idempotent: ``projx(projx(a)) = projx(a)`` and ``projx(x) = x``.

    ``x``: points; ``a``: ambient tensors near them (same shape).
    """
    p = m.projx(a)
    _on_manifold("projx lands on the manifold", m, p)
    assert_close(m.projx(p), p, atol, "projx idempotent: projx(projx(a)) vs projx(a)")
    assert_close(m.projx(x), x, atol, "projx idempotent: projx(x) vs x for a point x")


def check_proju(m: Manifold, x: Tensor, a: Tensor, atol: float) -> None:
    """``proju(x, a)`` is tangent at ``x`` (``check_vector``) and idempotent: ``proju(x, proju(x, a)) = proju(x, a)``.

    ``a``: arbitrary ambient vectors of the shape of ``x``.
    """
    u = m.proju(x, a)
    _on_manifold("proju tangent", m, x, u)
    assert_close(m.proju(x, u), u, atol, "proju idempotent: proju(x, proju(x, a)) vs proju(x, a)")


def check_exp_log(m: Manifold, x: Tensor, y: Tensor, atol: float) -> None:
    """``logmap(x, y)`` is tangent at ``x`` and ``expmap(x, logmap(x, y)) = y`` (exp(log) = id)."""
    v = m.logmap(x, y)
    _on_manifold("logmap tangent", m, x, v)
    assert_close(m.expmap(x, v), y, atol, "exp(log) = id: expmap(x, logmap(x, y)) vs y")


def check_log_exp(m: Manifold, x: Tensor, u: Tensor, atol: float) -> None:
    """``expmap(x, u)`` is a point and ``logmap(x, expmap(x, u)) = u`` (log(exp) = id).

    ``u``: tangent vectors at ``x`` inside the injectivity radius (``|u|`` below the cut locus distance).
    """
    y = m.expmap(x, u)
    _on_manifold("expmap lands on the manifold", m, y)
    assert_close(m.logmap(x, y), u, atol, "log(exp) = id: logmap(x, expmap(x, u)) vs u")


def check_dist(m: Manifold, x: Tensor, y: Tensor, z: Tensor | None = None, *, atol: float) -> None:
    """``dist`` has the batch shape and dtype, equals ``norm(x, logmap(x, y))``, is symmetric, zero on the diagonal
    and (given ``z``) obeys the triangle inequality ``d(x, z) <= d(x, y) + d(y, z) + atol``."""
    d_xy = m.dist(x, y)
    batch = _batch_shape(m, x)
    if tuple(d_xy.shape) != batch or d_xy.dtype != x.dtype:
        raise AssertionError(
            f"dist shape/dtype: got {tuple(d_xy.shape)} {d_xy.dtype}, expected the batch shape {batch} and {x.dtype}"
        )
    assert_close(d_xy, m.norm(x, m.logmap(x, y)), atol, "dist == norm(log): dist(x, y) vs |logmap(x, y)|")
    assert_close(d_xy, m.dist(y, x), atol, "dist symmetric: dist(x, y) vs dist(y, x)")
    if z is not None:
        excess = float((m.dist(x, z) - d_xy - m.dist(y, z)).max())
        if not excess <= atol:
            raise AssertionError(f"triangle inequality: d(x, z) exceeds d(x, y) + d(y, z) by {excess:.3g} > {atol:.3g}")
    assert_close(m.dist(x, x), torch.zeros(batch, dtype=x.dtype), atol, "dist(x, x) == 0")


def check_geodesic_endpoints(
    m: Manifold, x0: Tensor, x1: Tensor, atol: float, velocity_atol: float | None = None
) -> None:
    """Geodesic endpoints: ``x_0 = x0``, ``x_1 = x1``, ``u_0 = logmap(x0, x1)``, ``u_1 = -logmap(x1, x0)``.

    ``t = 0`` is passed per sample (a batch-shaped tensor), ``t = 1`` as a float. Velocities are compared to
    ``velocity_atol`` (default ``4 * atol``).
    """
    vel_atol = 4 * atol if velocity_atol is None else velocity_atol
    xa, ua = m.geodesic(x0, x1, torch.zeros(_batch_shape(m, x0), dtype=x0.dtype, device=x0.device))
    xb, ub = m.geodesic(x0, x1, 1.0)
    assert_close(xa, x0, atol, "geodesic endpoints: x_t at t=0 vs x0")
    assert_close(xb, x1, atol, "geodesic endpoints: x_t at t=1 vs x1")
    assert_close(ua, m.logmap(x0, x1), vel_atol, "geodesic endpoints: u_0 vs logmap(x0, x1)")
    assert_close(ub, -m.logmap(x1, x0), vel_atol, "geodesic endpoints: u_1 vs -logmap(x1, x0)")


def check_geodesic_velocity(m: Manifold, x0: Tensor, x1: Tensor, t: float, atol: float) -> None:
    """At time ``t`` (broadcast per sample): ``x_t`` is a point and ``u_t`` tangent there (dtype kept), the speed
    is constant ``|u_t| = dist(x0, x1)``, and for ``t < 0.9`` ``u_t = logmap(x_t, x1) / (1 - t)`` (to
    ``atol / (1 - t)``; near ``t = 1`` the division amplifies rounding)."""
    tt = torch.full(_batch_shape(m, x0), t, dtype=x0.dtype, device=x0.device)
    x_t, u_t = m.geodesic(x0, x1, tt)
    if x_t.dtype != x0.dtype or u_t.dtype != x0.dtype:
        raise AssertionError(f"geodesic dtype: returned {x_t.dtype}/{u_t.dtype} for {x0.dtype} input")
    _on_manifold(f"geodesic x_t on the manifold (t={t:g})", m, x_t)
    _on_manifold(f"u_t tangent at x_t (t={t:g})", m, x_t, u_t)
    assert_close(m.norm(x_t, u_t), m.dist(x0, x1), atol, f"u_t constant speed: |u_t| vs dist(x0, x1) at t={t:g}")
    if t < 0.9:
        expected = m.logmap(x_t, x1) / (1.0 - t)
        assert_close(u_t, expected, atol / (1.0 - t), f"u_t == log(x_t, x1)/(1-t): mismatch at t={t:g}")


def check_geodesic_finite_difference(
    m: Manifold, x0: Tensor, x1: Tensor, t: float, atol: float, h: float = 1e-5, diff: Diff | None = None
) -> None:
    """``u_t`` equals the float64 central difference ``(x_{t+h} - x_{t-h}) / 2h`` of the geodesic's own points.

    The reference uses only ``geodesic``'s points, never its velocities. ``x0``/``x1`` are upcast to float64
    (pass float64 points for an exact on-manifold check). ``diff(a, b)`` replaces ``a - b`` for charts that wrap
    (e.g. ``wrap_angle(a - b)`` on a flat torus). Needs ``h <= t <= 1 - h``.
    """
    if not h <= t <= 1.0 - h:
        raise ValueError(f"finite difference at t={t:g} needs h <= t <= 1 - h (h={h:g})")
    sub = diff if diff is not None else torch.sub
    x0, x1 = x0.double(), x1.double()
    _, u_t = m.geodesic(x0, x1, t)
    x_plus, _ = m.geodesic(x0, x1, t + h)
    x_minus, _ = m.geodesic(x0, x1, t - h)
    fd = sub(x_plus, x_minus) / (2 * h)
    assert_close(u_t, fd, atol, f"u_t vs float64 central finite difference of x_t at t={t:g}")


def check_transp(
    m: Manifold, x: Tensor, y: Tensor, v: Tensor, w: Tensor, atol: float, velocity_atol: float | None = None
) -> None:
    """Parallel transport from ``T_x`` to ``T_y`` is an isometry and carries the geodesic's velocity along.

    ``v``, ``w``: tangent vectors at ``x``. Checks ``transp(x, y, v)`` is tangent at ``y``,
    ``<Tv, Tw>_y = <v, w>_x``, ``|Tv|_y = |v|_x`` (to ``atol``) and
    ``transp(x, y, logmap(x, y)) = -logmap(y, x)`` (to ``velocity_atol``, default ``atol``).
    """
    vel_atol = atol if velocity_atol is None else velocity_atol
    tv, tw = m.transp(x, y, v), m.transp(x, y, w)
    _on_manifold("transp tangent", m, y, tv)
    assert_close(m.inner(y, tv, tw), m.inner(x, v, w), atol, "transp isometry: <Tv, Tw>_y vs <v, w>_x")
    assert_close(m.norm(y, tv), m.norm(x, v), atol, "transp isometry: |Tv|_y vs |v|_x")
    vel = m.transp(x, y, m.logmap(x, y))
    assert_close(vel, -m.logmap(y, x), vel_atol, "transp of the geodesic velocity: T log_x(y) vs -log_y(x)")


# ---------------------------------------------------------------------------------------------------- all of it
_BASE_TOL = {torch.float64: 1e-9, torch.float32: 2e-5}


def _tangent(m: Manifold, x: Tensor, norms: Tensor, g: torch.Generator) -> Tensor:
    """Random tangent vectors at ``x`` with Riemannian norms ``norms`` (batch-shaped)."""
    u = m.proju(x, torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype))
    n = m.norm(x, u).clamp_min(torch.finfo(x.dtype).tiny)
    return u * _batch_view(norms.to(x.dtype) / n, x, m)


def check_manifold(
    manifold: Manifold,
    x0: Tensor,
    x1: Tensor,
    *,
    t: float | Sequence[float] | None = None,
    atol: float | None = None,
    max_tangent: float | None = None,
    diff: Diff | None = None,
    transp: bool = True,
    seed: int = 0,
) -> None:
    """Check the whole manifold contract on the point batches ``x0``, ``x1`` (same shape and dtype).

    Raises ``AssertionError`` with a one-line message naming the first property that fails, in this order:
    projx idempotent; proju tangent and idempotent; exp(log) = id; log(exp) = id; dist == norm(log), symmetric,
    triangle inequality; geodesic endpoints; at each time in ``t``: ``x_t`` on the manifold, ``u_t`` tangent with
    constant speed ``dist(x0, x1)`` and ``u_t == log(x_t, x1)/(1-t)``; then at each time ``u_t`` vs a float64
    central finite difference of ``x_t``; transp isometry (skipped with ``transp=False``: the base class's default
    ``transp`` is a projection, not an isometry).

    Args:
        manifold: the manifold under test.
        x0, x1: valid points (``manifold.check_point`` passes), ideally not too close to each other's cut locus.
        t: times for the geodesic checks (default ``(0.0, 0.3, 0.5, 0.8, 1.0)``; the finite difference is taken
            at ``t`` clamped to ``[0.01, 0.99]``).
        atol: base absolute tolerance; each check uses the multiple of it the contract suite uses (1x projx,
            4x proju/exp(log)/dist/endpoints, 10x log(exp), 8x velocity, 20x/scale isometry). Default:
            ``scale * (1e-9 for float64, 2e-5 for float32, 1e-2 otherwise)``, with ``scale`` the largest
            coordinate magnitude of ``x0``, ``x1`` (at least 1).
        max_tangent: largest tangent norm for log(exp); default half of ``dist(x0, x1)`` per sample (inside the
            injectivity radius when ``logmap`` returns shortest geodesics).
        diff: replaces ``a - b`` in the finite difference, for charts that wrap (see
            :func:`check_geodesic_finite_difference`).
        transp: whether to check that ``transp`` is an isometry.
        seed: seed of the random ambient vectors and tangent directions the checks draw.
    """
    m = manifold
    if x0.shape != x1.shape or x0.dtype != x1.dtype:
        raise ValueError(
            f"check_manifold needs x0 and x1 of one shape and dtype, got {tuple(x0.shape)} {x0.dtype} and "
            f"{tuple(x1.shape)} {x1.dtype}"
        )
    _on_manifold("input x0 is a point", m, x0)
    _on_manifold("input x1 is a point", m, x1)
    dtype = x0.dtype
    scale = max(1.0, float(x0.double().abs().max()), float(x1.double().abs().max()))
    tol = scale * _BASE_TOL.get(dtype, 1e-2) if atol is None else atol
    times = (0.0, 0.3, 0.5, 0.8, 1.0) if t is None else ((t,) if isinstance(t, (int, float)) else tuple(t))
    g = torch.Generator().manual_seed(seed)

    def ambient() -> Tensor:
        return torch.randn(x0.shape, generator=g, dtype=torch.float64).to(dtype)

    check_projx(m, x0, x0 + 0.1 * scale * ambient(), tol)
    check_proju(m, x0, ambient(), 4 * tol)
    check_exp_log(m, x0, x1, 4 * tol)
    batch = _batch_shape(m, x0)
    fracs = torch.linspace(0.0, 1.0, math.prod(batch), dtype=torch.float64).reshape(batch)
    radius = 0.5 * m.dist(x0, x1).double() if max_tangent is None else torch.full(batch, float(max_tangent))
    check_log_exp(m, x0, _tangent(m, x0, fracs * radius, g), 10 * tol)
    check_dist(m, x0, x1, m.projx(x0 + 0.5 * scale * ambient()), atol=4 * tol)
    check_geodesic_endpoints(m, x0, x1, 4 * tol)
    x0d, x1d = m.projx(x0.double()), m.projx(x1.double())  # on-manifold float64 copies for the reference
    for ti in times:
        check_geodesic_velocity(m, x0, x1, float(ti), 8 * tol)
    for ti in times:
        check_geodesic_finite_difference(m, x0d, x1d, min(max(float(ti), 0.01), 0.99), 1e-5 * scale, diff=diff)
    if transp:
        ones = torch.ones(batch, dtype=torch.float64)
        v, w = _tangent(m, x0, ones, g), _tangent(m, x0, 0.5 * ones, g)
        check_transp(m, x0, x1, v, w, 20 * tol / scale, 10 * tol)
