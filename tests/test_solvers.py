"""Manifold ODE solvers: convergence orders on a flow with a closed form, on-manifold accuracy, NFE, grids."""

from __future__ import annotations

import math

import pytest
import torch

from manifold_fm.manifolds import Euclidean, FlatTorus, GeooptManifold, Sphere, TokenSpheres
from manifold_fm.solvers import IntegrationStats, adaptive_methods, integrate
from manifold_fm.time import shift_time_grid

D64 = torch.float64
OMEGA = torch.tensor([0.3, -0.5, 0.8], dtype=D64)


def rotation(speed=lambda t: 1.0):  # noqa: ANN001, ANN202
    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        w = OMEGA.to(x.dtype)
        s = speed(t).reshape(-1, *([1] * (x.ndim - 1))) if torch.is_tensor(speed(t)) else speed(t)
        return s * torch.cross(w.expand_as(x), x, dim=-1)

    return v


def rodrigues(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotation of x about OMEGA by |OMEGA| * angle (the exact flow of the rotation field)."""
    th = float(OMEGA.norm()) * angle
    k = OMEGA / OMEGA.norm()
    kx = torch.cross(k.expand_as(x), x, dim=-1)
    return x * math.cos(th) + kx * math.sin(th) + k * (x @ k)[:, None] * (1 - math.cos(th))


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2), ("midpoint", 2), ("rk4", 4)])
def test_error_falls_at_the_method_order(method: str, order: int) -> None:
    m = Sphere()
    x0 = m.random_base((32, 3), torch.Generator().manual_seed(0), dtype=D64)
    ref = rodrigues(x0, 2.0)
    errs = []
    for n in (8, 16, 32, 64):
        x = integrate(rotation(), x0, m, t1=2.0, steps=n, method=method)
        errs.append(float((x - ref).norm(dim=-1).max()))
    rates = [math.log2(a / b) for a, b in zip(errs, errs[1:], strict=False)]
    assert all(abs(r - order) < 0.25 for r in rates), (errs, rates)


def _order_cases() -> dict[str, tuple]:
    """Manifold, point batch shape and a smooth analytic time-dependent ambient field (periodic in angle
    coordinates, bounded where the manifold is unbounded) for the convergence-order test on each geometry."""
    import geoopt

    from manifold_fm.manifolds import Product

    g = torch.Generator().manual_seed(21)
    w_prod, b_prod = torch.randn(7, 5, generator=g, dtype=D64), torch.randn(5, generator=g, dtype=D64)
    w_tor, b_tor = torch.randn(6, 3, generator=g, dtype=D64), torch.randn(3, generator=g, dtype=D64)
    w_ball, b_ball = torch.randn(2, 2, generator=g, dtype=D64), torch.randn(2, generator=g, dtype=D64)
    w_lor, b_lor = torch.randn(3, 3, generator=g, dtype=D64), torch.randn(3, generator=g, dtype=D64)

    def product(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # S^2 (3 coordinates) | T^2 (2 angles)
        feats = torch.cat([x[..., :3], torch.sin(x[..., 3:]), torch.cos(x[..., 3:])], -1)
        return (1 + t[:, None]) * torch.tanh(feats @ w_prod + b_prod)

    def torus(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.7 * (1 + t[:, None]) * torch.tanh(torch.cat([torch.sin(x), torch.cos(x)], -1) @ w_tor + b_tor)

    def ball(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (1 + t[:, None]) * torch.tanh(x @ w_ball + b_ball) * (1 - x.square().sum(-1, keepdim=True))

    def lorentz(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # / x_0: bounded Riemannian speed
        return (1 + t[:, None]) * torch.tanh(0.5 * x @ w_lor + b_lor) / x[..., :1]

    def spd(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        w = 0.5 * torch.tanh(x.roll(1, dims=-1) - 0.5 * x + t[:, None, None])
        return w @ x + x @ w.transpose(-1, -2)

    return {
        "product_s2_t2": (Product([(Sphere(), 3), (FlatTorus(), 2)]), (6, 5), product),
        "flat_torus": (FlatTorus(), (6, 3), torus),
        "poincare_ball": (GeooptManifold(geoopt.PoincareBall()), (4, 2), ball),
        "lorentz": (GeooptManifold(geoopt.Lorentz()), (6, 3), lorentz),
        "spd": (GeooptManifold(geoopt.SymmetricPositiveDefinite()), (6, 2, 2), spd),
    }


@pytest.mark.parametrize("case", ["product_s2_t2", "flat_torus", "poincare_ball", "lorentz", "spd"])
def test_error_falls_at_the_method_order_on_every_geometry(case: str) -> None:
    """Exp-map steppers with the ``dlog`` pull-back against a fine reference from a second scheme (classical RK4 in
    ambient coordinates with projection, 256 steps): the geodesic error falls at the classical order on a product
    with a curved factor, the flat torus, both hyperbolic models and SPD matrices. Measured rates (seed 21):
    Euler 0.97-1.00, Heun/midpoint 1.81-2.13, RK4 3.84-4.06."""
    m, shape, field = _order_cases()[case]
    x0 = m.random_base(shape, torch.Generator().manual_seed(3), dtype=D64)
    ref = integrate(field, x0, m, steps=256, method="rk4", transport="ambient")
    assert float(m.dist(x0, ref).min()) > 0.5  # every point moved well beyond the errors measured
    levels = {"euler": (32, 64, 128), "heun": (16, 32, 64), "midpoint": (16, 32, 64), "rk4": (16, 32, 64)}
    for method, order in (("euler", 1), ("heun", 2), ("midpoint", 2), ("rk4", 4)):
        errs = [float(m.dist(integrate(field, x0, m, steps=n, method=method), ref).max()) for n in levels[method]]
        rates = [math.log2(a / b) for a, b in zip(errs, errs[1:], strict=False)]
        assert all(abs(r - order) < 0.25 for r in rates), (method, errs, rates)


def test_sphere_dlog_closed_form_equals_forward_mode_jvp() -> None:
    import torch.autograd.forward_ad as fwAD

    for m, shape in ((Sphere(2.0), (16, 3)), (TokenSpheres(4, axis=1), (3, 4, 2, 2))):
        g = torch.Generator().manual_seed(11)
        x = m.random_base(shape, g, dtype=D64)
        for scale in (1e-5, 0.03, 0.5, 2.5):  # angles from tiny to near the cut locus
            u = m.proju(x, torch.randn(shape, generator=g, dtype=D64))
            u = u / torch.linalg.vector_norm(u, dim=m.axis, keepdim=True) * scale * m.radius
            y = m.expmap(x, u)
            v = m.proju(y, torch.randn(shape, generator=g, dtype=D64))
            with torch.enable_grad(), fwAD.dual_level():  # requires_grad: the sphere's differentiable branch
                ref = fwAD.unpack_dual(m.logmap(x, fwAD.make_dual(y.clone().requires_grad_(True), v))).tangent
            torch.testing.assert_close(m.dlogmap(x, y, v), ref.detach(), atol=1e-12, rtol=1e-10)


def test_generic_pull_back_on_a_product_and_poincare_ball() -> None:
    """The generic forward-AD pull-back (Poincare ball) and the factor-wise one (product) against finite differences
    of log_x along the geodesic through y with velocity v."""
    import geoopt

    from manifold_fm.manifolds import Product
    from manifold_fm.solvers import pull_back

    for m, shape in (
        (GeooptManifold(geoopt.PoincareBall()), (6, 2)),
        (Product([(Sphere(), 3), (FlatTorus(), 2)]), (6, 5)),
    ):
        g = torch.Generator().manual_seed(12)
        x = m.random_base(shape, g, dtype=D64)
        y = m.expmap(x, 0.3 * m.proju(x, torch.randn(shape, generator=g, dtype=D64)))
        v = m.proju(y, torch.randn(shape, generator=g, dtype=D64))
        h = 1e-6
        fd = (m.logmap(x, m.expmap(y, h * v)) - m.logmap(x, m.expmap(y, -h * v))) / (2 * h)
        torch.testing.assert_close(pull_back(m, x, y, v), fd, atol=1e-7, rtol=1e-6)


def test_spd_closed_form_dlog_matches_the_jvp_and_finite_differences_and_is_finite_at_equal_eigenvalues() -> None:
    """The Daleckii-Krein d(log_x) of SPD matrices against the generic forward-mode JVP through geoopt's logmap and
    central differences of log_x along exp_y; at y = x and y = 1.7 x (equal eigenvalues of x^-1/2 y x^-1/2), where the
    JVP divides by the eigenvalue gap (NaN for y = exp_x(0) on torch 2.14, an eigh failure on 2.4), the closed form
    still matches the differences."""
    import geoopt

    from manifold_fm.manifolds import Manifold

    m = GeooptManifold(geoopt.SymmetricPositiveDefinite())
    h = 1e-6
    for n in (2, 3):
        g = torch.Generator().manual_seed(n)
        x = m.random_base((16, n, n), g, dtype=D64)
        for scale in (1e-7, 1e-3, 0.3, 1.5):
            y = m.expmap(x, scale * m.proju(x, torch.randn(16, n, n, generator=g, dtype=D64)))
            v = m.proju(y, torch.randn(16, n, n, generator=g, dtype=D64))
            fd = (m.logmap(x, m.expmap(y, h * v)) - m.logmap(x, m.expmap(y, -h * v))) / (2 * h)
            torch.testing.assert_close(m.dlogmap(x, y, v), fd, atol=5e-6 * (1 + scale) ** 4, rtol=0)
            torch.testing.assert_close(m.dlogmap(x, y, v), Manifold.dlogmap(m, x, y, v), atol=1e-9, rtol=1e-9)
        for y in (x, 1.7 * x):
            v = m.proju(y, torch.randn(16, n, n, generator=g, dtype=D64))
            fd = (m.logmap(x, y + h * v) - m.logmap(x, y - h * v)) / (2 * h)
            torch.testing.assert_close(m.dlogmap(x, y, v), fd, atol=1e-8, rtol=0)


def test_ambient_projected_rk4_keeps_fourth_order_on_the_sphere() -> None:
    m = Sphere()
    x0 = m.random_base((16, 3), torch.Generator().manual_seed(13), dtype=D64)
    ref = rodrigues(x0, 2.0)
    errs = [
        float((integrate(rotation(), x0, m, t1=2.0, steps=n, method="rk4", transport="ambient") - ref).abs().max())
        for n in (8, 16, 32)
    ]
    assert all(abs(math.log2(a / b) - 4) < 0.3 for a, b in zip(errs, errs[1:], strict=False)), errs


def test_parallel_and_projection_transport_options_keep_second_order() -> None:
    m = Sphere()
    x0 = m.random_base((16, 3), torch.Generator().manual_seed(1), dtype=D64)
    ref = rodrigues(x0, 1.0)
    for transport in ("parallel", "project"):
        e1 = float((integrate(rotation(), x0, m, steps=16, method="heun", transport=transport) - ref).abs().max())
        e2 = float((integrate(rotation(), x0, m, steps=32, method="heun", transport=transport) - ref).abs().max())
        assert abs(math.log2(e1 / e2) - 2) < 0.25


def field_on_token_spheres(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A nonlinear, time-dependent ambient field (the solver must project it)."""
    return torch.sin(x.roll(1, dims=1)) * (1 + t.view(-1, 1, 1, 1)) + 0.5 * x


@pytest.mark.parametrize("method", ["euler", "heun", "midpoint", "rk4", "dopri5", "bosh3"])
def test_samples_stay_on_the_manifold_float32(method: str) -> None:
    m = TokenSpheres(4, axis=1)
    x0 = m.random_base((2, 4, 4, 4), torch.Generator().manual_seed(2))
    x = integrate(
        field_on_token_spheres,
        x0,
        m,
        steps=4 if method in adaptive_methods() else 20,
        method=method,
        atol=1e-3,
        rtol=1e-3,
    )
    assert x.dtype == torch.float32 and x.shape == x0.shape
    assert float(m.point_error(x).max()) < 1e-5
    assert float((x - x0).abs().max()) > 0.1  # it moved


@pytest.mark.parametrize("method", ["midpoint", "rk4"])
def test_ambient_stepper_stays_on_the_manifold_float32(method: str) -> None:
    for m, shape in ((TokenSpheres(4, axis=1), (2, 4, 4, 4)), (FlatTorus(), (8, 3))):
        x0 = m.random_base(shape, torch.Generator().manual_seed(14))
        x = integrate(
            lambda x, t: torch.sin(x.roll(1, dims=1)) * 3, x0, m, steps=10, method=method, transport="ambient"
        )
        assert float(m.point_error(x).max()) < 1e-5


def test_adaptive_dopri5_is_accurate_and_counts_evaluations() -> None:
    m = Sphere()
    x0 = m.random_base((16, 3), torch.Generator().manual_seed(3), dtype=D64)
    stats = IntegrationStats()
    x = integrate(rotation(), x0, m, method="dopri5", atol=1e-10, rtol=1e-10, stats=stats)
    assert float((x - rodrigues(x0, 1.0)).abs().max()) < 1e-8
    assert stats.nfe > 8 and stats.steps == 8 and stats.method == "dopri5"


@pytest.mark.parametrize("method,stages", [("euler", 1), ("heun", 2), ("midpoint", 2), ("rk4", 4)])
def test_fixed_methods_nfe(method: str, stages: int) -> None:
    m = Sphere()
    calls = []

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape)
        return rotation()(x, t)

    stats = IntegrationStats()
    integrate(v, m.random_base((5, 3)), m, steps=7, method=method, stats=stats)
    assert stats.nfe == len(calls) == 7 * stages
    assert all(s == (5,) for s in calls)  # t arrives as a (B,) tensor


def test_reverse_integration_and_any_start_time() -> None:
    m = Sphere()
    x0 = m.random_base((8, 3), torch.Generator().manual_seed(4), dtype=D64)
    speed = lambda t: 1.0 + t  # noqa: E731  angle from a to b: (b - a) + (b^2 - a^2)/2
    x_mid = integrate(rotation(speed), x0, m, t0=0.3, t1=0.8, steps=20, method="rk4")
    torch.testing.assert_close(x_mid, rodrigues(x0, 0.5 + (0.64 - 0.09) / 2), atol=1e-7, rtol=0)
    back = integrate(rotation(speed), x_mid, m, t0=0.8, t1=0.3, steps=20, method="rk4")
    torch.testing.assert_close(back, x0, atol=1e-7, rtol=0)
    back_ad = integrate(rotation(speed), x_mid, m, t0=0.8, t1=0.3, method="dopri5", atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(back_ad, x0, atol=1e-7, rtol=0)


def test_time_grid_shifted_schedule_and_intermediates() -> None:
    m = Sphere()
    x0 = m.random_base((6, 3), torch.Generator().manual_seed(5), dtype=D64)
    speed = lambda t: 1.0 + t  # noqa: E731
    grid = shift_time_grid(torch.linspace(0, 1, 41, dtype=D64), 3.0)
    x, traj = integrate(rotation(speed), x0, m, time_grid=grid, method="rk4", return_intermediates=True)
    assert traj.shape == (41, 6, 3) and torch.equal(traj[0], x0) and torch.equal(traj[-1], x)
    torch.testing.assert_close(x, rodrigues(x0, 1.5), atol=1e-6, rtol=0)
    k = 20
    tk = float(grid[k])
    torch.testing.assert_close(traj[k], rodrigues(x0, tk + tk * tk / 2), atol=1e-6, rtol=0)


def test_other_manifolds() -> None:
    # Euclidean: dx/dt = -x -> x e^{-1}
    x0 = torch.randn(4, 3, dtype=D64)
    x = integrate(lambda x, t: -x, x0, Euclidean(), steps=20, method="rk4")
    torch.testing.assert_close(x, x0 * math.exp(-1), atol=1e-7, rtol=0)
    # Flat torus: constant velocity wraps around
    t0 = torch.tensor([[3.0, -3.0]], dtype=D64)
    xt = integrate(lambda x, t: torch.tensor([[1.0, -1.0]], dtype=D64).expand_as(x), t0, FlatTorus(), steps=3)
    torch.testing.assert_close(xt, torch.tensor([[4.0 - 2 * math.pi, 2 * math.pi - 4.0]], dtype=D64))
    # Poincare ball via geoopt: stays inside the ball
    import geoopt

    ball = GeooptManifold(geoopt.PoincareBall())
    xb = ball.random_base((8, 2), torch.Generator().manual_seed(6))
    out = integrate(lambda x, t: torch.ones_like(x), xb, ball, steps=10, method="rk4")
    assert float(out.norm(dim=-1).max()) < 1.0 and float(ball.point_error(out).max()) < 1e-5


def test_low_precision_input_is_returned_in_its_dtype_on_the_manifold() -> None:
    m = TokenSpheres(8, axis=-1)
    x0 = m.random_base((3, 5, 8), torch.Generator().manual_seed(7)).bfloat16()
    seen = []

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x.dtype)
        return torch.flip(x, dims=[-1])

    x = integrate(v, x0, m, steps=10, method="heun")
    assert x.dtype == torch.bfloat16 and set(seen) == {torch.bfloat16}
    assert float(m.point_error(x.float()).max()) < 1e-2  # bf16 rounding of the output only


def test_bad_inputs() -> None:
    m = Sphere()
    x0 = m.random_base((2, 3))
    with pytest.raises(ValueError, match="unknown method"):
        integrate(rotation(), x0, m, method="rk45")
    with pytest.raises(ValueError, match="fixed-step"):
        integrate(rotation(), x0, m, method="dopri5", transport="ambient")
    with pytest.raises(ValueError, match="steps"):
        integrate(rotation(), x0, m, steps=0)
    with pytest.raises(ValueError, match="must match"):
        integrate(lambda x, t: x[:, :2], x0, m, steps=2)
    with pytest.raises(ValueError, match="strictly"):
        integrate(rotation(), x0, m, time_grid=[0.0, 0.5, 0.4])
    with pytest.raises(ValueError, match="NaN"):
        integrate(rotation(), x0 * float("nan"), m, steps=2)
    with pytest.raises(ValueError, match="NaN/Inf"):
        integrate(lambda x, t: x * float("inf"), x0, m, steps=2)


def test_dlog_pull_back_refuses_a_logmap_that_drops_the_forward_ad_tangent():
    """A manifold whose logmap cuts the tangent (e.g. a non-differentiable kernel) must not yield silent zeros."""
    from manifold_fm.manifolds import Manifold
    from manifold_fm.solvers import pull_back

    class Opaque(Euclidean):
        dlogmap = Manifold.dlogmap  # the generic forward-AD default, not Euclidean's closed form

        def logmap(self, x, y):
            return (y - x).detach()  # drops the forward-AD tangent

    x, y, v = torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="lost the forward-mode AD tangent"):
        pull_back(Opaque(), x, y, v)
    torch.testing.assert_close(pull_back(Euclidean(), x, y, v), v)
