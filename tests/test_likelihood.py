"""Manifold log-likelihoods against closed forms and normalisation by quadrature (independent of the ODE)."""

from __future__ import annotations

import math

import geoopt
import pytest
import torch

from manifold_fm.likelihood import base_log_prob, divergence, log_likelihood
from manifold_fm.manifolds import FlatTorus, GeooptManifold, Product, Sphere, TokenSpheres
from manifold_fm.solvers import IntegrationStats

from helpers import sphere_grid

D64 = torch.float64
A = torch.tensor([0.0, 0.0, 1.0], dtype=D64)


def zero(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def rotation(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([0.3, -0.5, 0.8], dtype=x.dtype)
    return torch.cross(w.expand_as(x), x, dim=-1)


def toward_pole(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The ambient constant field a; projected: P_x a = grad of <a, x>, flowing toward a."""
    return A.to(x.dtype).expand_as(x)


def pole_flow_log_density(x1: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Closed form for toward_pole from the uniform prior: along meridians tan(th/2) = tan(th0/2) e^{-t}, so with
    area element sin(th) dth dphi, p1 = p0 * sin(th0) / sin(th1) * dth0/dth1."""
    th1 = torch.acos(x1[..., 2].clamp(-1, 1))
    th0 = 2 * torch.atan(torch.tan(th1 / 2) * math.exp(T))
    jac = math.exp(T) * torch.cos(th0 / 2) ** 2 / torch.cos(th1 / 2) ** 2
    return -math.log(4 * math.pi) + torch.log(torch.sin(th0) / torch.sin(th1)) + torch.log(jac)


@pytest.mark.parametrize("R", [1.0, 2.0])
def test_uniform_prior_and_rotation_give_minus_log_area(R: float) -> None:
    m = Sphere(R)
    x = m.random_base((16, 3), torch.Generator().manual_seed(0), dtype=D64)
    area = 4 * math.pi * R * R
    for field, steps in ((zero, 2), (rotation, 10)):
        for div in ("exact", "hutchinson"):
            lp = log_likelihood(field, x, m, steps=steps, divergence_method=div, generator=torch.Generator())
            torch.testing.assert_close(lp, torch.full((16,), -math.log(area), dtype=D64), atol=1e-10, rtol=0)


def test_token_spheres_uniform_prior_is_a_sum_over_tokens() -> None:
    m = TokenSpheres(3, axis=-1, radius=1.0)
    x = m.random_base((4, 5, 3), torch.Generator().manual_seed(1), dtype=D64)
    lp = log_likelihood(zero, x, m, steps=1)
    torch.testing.assert_close(lp, torch.full((4,), -5 * math.log(4 * math.pi), dtype=D64))
    m5 = TokenSpheres(5, axis=1)  # S^4(sqrt 5): area 8 pi^2 R^4 / 3
    x5 = m5.random_base((2, 5, 2, 1), dtype=D64)
    ref = -2 * math.log(8 * math.pi**2 * 25 / 3)
    torch.testing.assert_close(base_log_prob(m5, x5), torch.full((2,), ref, dtype=D64))


@pytest.mark.parametrize("method,steps,tol", [("rk4", 40, 1e-7), ("dopri5", 4, 1e-6), ("heun", 200, 1e-3)])
def test_conformal_flow_matches_closed_form_density(method: str, steps: int, tol: float) -> None:
    m = Sphere()
    x = m.random_base((32, 3), torch.Generator().manual_seed(2), dtype=D64)
    lp = log_likelihood(toward_pole, x, m, steps=steps, method=method, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lp, pole_flow_log_density(x), atol=tol, rtol=0)


def test_token_spheres_per_token_flow_sums_closed_forms() -> None:
    m = TokenSpheres(3, axis=-1, radius=1.0)
    x = m.random_base((6, 2, 3), torch.Generator().manual_seed(3), dtype=D64)
    lp = log_likelihood(toward_pole, x, m, steps=40)
    torch.testing.assert_close(lp, pole_flow_log_density(x).sum(-1), atol=1e-7, rtol=0)


def test_divergence_of_gradient_field_is_the_laplacian() -> None:
    """On S^{n-1}(R), P_x a is the gradient of f = <a, x>, and Laplace f = -(n-1) f / R^2."""
    n, R = 5, 1.5
    m = Sphere(R)
    g = torch.Generator().manual_seed(4)
    a = torch.randn(n, generator=g, dtype=D64)
    x = m.random_base((10, n), g, dtype=D64)
    _, div = divergence(m, lambda z: a.expand_as(z), x)
    torch.testing.assert_close(div, -(n - 1) * (x @ a) / R**2)


def test_hutchinson_agrees_with_exact_in_expectation() -> None:
    m = TokenSpheres(4, axis=1)
    g = torch.Generator().manual_seed(5)
    x = m.random_base((3, 4, 2, 2), g, dtype=D64)
    w = torch.randn(16, 16, generator=g, dtype=D64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z.reshape(3, 16) @ w).reshape(z.shape)

    _, exact = divergence(m, f, x)
    probes = torch.randn(4000, *x.shape, generator=g, dtype=D64)
    _, est = divergence(m, f, x, "hutchinson", probes)
    # per-probe values to get the Monte Carlo standard error
    singles = torch.stack([divergence(m, f, x, "hutchinson", probes[i : i + 1])[1] for i in range(200)])
    se = singles.std(dim=0) / math.sqrt(4000)
    assert bool(((est - exact).abs() < 4 * se + 1e-9).all()), (est, exact, se)


def test_learned_style_flow_density_integrates_to_one_on_s2() -> None:
    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.sin(2 * x.roll(1, dims=-1)) * (1 + t[:, None]) + 0.7 * A

    x, dA = sphere_grid(30)
    lp = log_likelihood(v, x, Sphere(), steps=12, method="rk4")
    assert abs(float((lp.exp() * dA).sum()) - 1.0) < 3e-3
    assert float(lp.max() - lp.min()) > 1.0  # the density is far from uniform


def test_poincare_base_and_flow_densities_integrate_to_one() -> None:
    ball = GeooptManifold(geoopt.PoincareBall(), base_std=0.5)
    # geodesic polar coordinates: x = tanh(r/2) (cos phi, sin phi), hyperbolic area sinh(r) dr dphi (c = 1)
    nr, nphi, rmax = 160, 48, 9.0
    r = (torch.arange(nr, dtype=D64) + 0.5) * rmax / nr
    phi = (torch.arange(nphi, dtype=D64) + 0.5) * 2 * math.pi / nphi
    Rg, Pg = torch.meshgrid(r, phi, indexing="ij")
    x = (torch.tanh(Rg / 2)[..., None] * torch.stack([torch.cos(Pg), torch.sin(Pg)], -1)).reshape(-1, 2)
    dvol = (torch.sinh(Rg) * (rmax / nr) * (2 * math.pi / nphi)).reshape(-1)
    assert abs(float((base_log_prob(ball, x).exp() * dvol).sum()) - 1.0) < 1e-3

    def v(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.8 * torch.tanh(z.roll(1, dims=-1) + 0.3) * (1 - z.square().sum(-1, keepdim=True))

    inner = r < 6.0  # the flow is integrated only where the base puts non-negligible mass (speed)
    keep = inner[:, None].expand(nr, nphi).reshape(-1)
    lp = log_likelihood(v, x[keep], ball, steps=10, method="rk4")
    assert abs(float((lp.exp() * dvol[keep]).sum()) - 1.0) < 5e-3
    lp0 = log_likelihood(zero, x[:5], ball, steps=1)
    torch.testing.assert_close(lp0, base_log_prob(ball, x[:5]))


def test_torus_flow_density_integrates_to_one_and_product_prior() -> None:
    n = 48
    a = (torch.arange(n, dtype=D64) + 0.5) * 2 * math.pi / n - math.pi
    X, Y = torch.meshgrid(a, a, indexing="ij")
    x = torch.stack([X, Y], -1).reshape(-1, 2)

    def v(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(z.roll(1, dims=-1)) + 0.5 * torch.cos(z) * t[:, None]

    lp = log_likelihood(v, x, FlatTorus(), steps=10)
    assert abs(float((lp.exp() * (2 * math.pi / n) ** 2).sum()) - 1.0) < 1e-3
    prod = Product([(Sphere(), 3), (FlatTorus(), 2)])
    z = prod.random_base((3, 5), dtype=D64)
    ref = -math.log(4 * math.pi) - 2 * math.log(2 * math.pi)
    torch.testing.assert_close(log_likelihood(zero, z, prod, steps=1), torch.full((3,), ref, dtype=D64))


def test_stats_base_points_and_unsupported_manifold() -> None:
    m = Sphere()
    x = m.random_base((4, 3), dtype=D64)
    stats = IntegrationStats()
    lp, x0 = log_likelihood(rotation, x, m, steps=5, method="midpoint", return_base=True, stats=stats)
    assert stats.nfe == 10 and x0.shape == x.shape and lp.shape == (4,)
    other = GeooptManifold(geoopt.Sphere())  # a geoopt model whose base density the adapter does not know
    with pytest.raises(NotImplementedError, match="has no base_log_prob"):
        log_likelihood(zero, other.random_base((2, 3), dtype=D64), other, steps=1)


def test_poincare_ambient_and_dlog_transport_agree_with_a_fine_reference() -> None:
    """toy-hyperbolic evaluates with transport='ambient' (classical RK4 in the disk's coordinates): on a
    time-dependent field, at 40 steps as in the config, its log-likelihoods match the exp-map chart stepper (dlog, a
    JVP through geoopt's logmap per stage) and a 200-step reference."""
    ball = GeooptManifold(geoopt.PoincareBall(), base_std=0.5)
    x = ball.random_base((32, 2), generator=torch.Generator().manual_seed(3), dtype=D64)

    def v(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shrink = 1 - z.square().sum(-1, keepdim=True)  # vanishes at the boundary: the flow stays in the disk
        return (1 + t[:, None]) * torch.tanh(z.roll(1, dims=-1) - 0.4 * z + 0.2) * shrink

    ref = log_likelihood(v, x, ball, steps=200, method="rk4", transport="ambient")
    for transport in ("ambient", "dlog"):
        lp = log_likelihood(v, x, ball, steps=40, method="rk4", transport=transport)
        assert float((lp - ref).abs().max()) < 1e-5, transport
    coarse = log_likelihood(v, x, ball, steps=2, method="euler", transport="ambient")
    assert float((coarse - ref).abs().max()) > 1e-3  # the comparison can tell solvers apart
