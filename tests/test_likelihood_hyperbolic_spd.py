"""Hyperbolic space (Lorentz hyperboloid) and SPD matrices as full citizens of the likelihood: the wrapped-normal base
densities against quadrature in coordinates built from the metric alone, a second algorithm for the Jacobian of the
exponential map and the samples of ``random_base``; ``log_likelihood`` against closed forms (flows of isometries),
the Poincare-ball model carried over by the isometry between the models, and normalisation by quadrature."""

from __future__ import annotations

import math

import geoopt
import pytest
import torch

from manifold_fm.data.toy import LorentzWrappedNormalMixture, SPDWrappedNormalMixture, build_toy_dataset
from manifold_fm.likelihood import base_log_prob, log_likelihood
from manifold_fm.manifolds import GeooptManifold, Manifold
from manifold_fm.manifolds.geoopt_adapter import log_sinhc

D64 = torch.float64


def zero(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


# ----------------------------------------------------------------------------------------------- SPD helpers
def sym_from_coords(c: torch.Tensor, n: int) -> torch.Tensor:
    """The symmetric matrix with orthonormal (Frobenius) coordinates ``c`` (``m = n(n+1)/2``): ``S_ii = c_i`` then
    ``S_ij = S_ji = c_k / sqrt 2`` for ``i < j``."""
    s = torch.diag_embed(c[..., :n])
    iu = torch.triu_indices(n, n, offset=1)
    off = torch.zeros(*c.shape[:-1], n, n, dtype=c.dtype)
    off[..., iu[0], iu[1]] = c[..., n:] / math.sqrt(2.0)
    return s + off + off.transpose(-1, -2)


def gram(m: Manifold, x: torch.Tensor, vecs: list[torch.Tensor]) -> torch.Tensor:
    """``G_ij = <v_i, v_j>_x`` from the manifold's own metric (geoopt's ``inner``)."""
    k = len(vecs)
    return torch.stack([torch.stack([m.inner(x, vecs[i], vecs[j]) for j in range(k)], -1) for i in range(k)], -2)


def log_cholesky_grid(n: int, lo: float = -2.0, hi: float = 2.0, qmax: float = 3.0) -> tuple[torch.Tensor, ...]:
    """Midpoint grid on 2x2 SPD matrices ``X = L L^T``, ``L = [[e^p, 0], [q, e^r]]`` (a global chart), with the
    coordinate partials ``dX/dp, dX/dq, dX/dr`` and the cell size."""
    pr = lo + (torch.arange(n, dtype=D64) + 0.5) * (hi - lo) / n
    qs = -qmax + (torch.arange(n, dtype=D64) + 0.5) * 2 * qmax / n
    P, Q, R = (g.reshape(-1) for g in torch.meshgrid(pr, qs, pr, indexing="ij"))
    zero_, one = torch.zeros_like(P), torch.ones_like(P)
    L = torch.stack([torch.stack([P.exp(), zero_], -1), torch.stack([Q, R.exp()], -1)], -2)
    dL = [
        torch.stack([torch.stack([P.exp(), zero_], -1), torch.stack([zero_, zero_], -1)], -2),
        torch.stack([torch.stack([zero_, zero_], -1), torch.stack([one, zero_], -1)], -2),
        torch.stack([torch.stack([zero_, zero_], -1), torch.stack([zero_, R.exp()], -1)], -2),
    ]
    X = L @ L.transpose(-1, -2)
    dX = [d @ L.transpose(-1, -2) + L @ d.transpose(-1, -2) for d in dL]
    cell = ((hi - lo) / n) ** 2 * (2 * qmax / n)
    return X, dX, torch.tensor(cell, dtype=D64)


def spd_log(x: torch.Tensor) -> torch.Tensor:
    lam, vec = torch.linalg.eigh(x)
    return (vec * lam.log().unsqueeze(-2)) @ vec.transpose(-1, -2)


SPD = GeooptManifold(geoopt.SymmetricPositiveDefinite(), base_std=0.5)


# ----------------------------------------------------------------------------------------------- SPD base density
@pytest.mark.parametrize("n", [2, 3])
def test_spd_base_density_is_the_gaussian_over_the_autograd_jacobian_of_expm(n: int) -> None:
    """Second algorithm: the Jacobian of ``exp_I`` as ``sqrt det`` of the affine-invariant Gram matrix of the
    columns of ``d expm(S(c)) / dc`` (autograd through ``torch.linalg.matrix_exp``), no eigen-formula."""
    m_dim, sigma = n * (n + 1) // 2, SPD.base_std
    g = torch.Generator().manual_seed(n)
    for scale in (1e-3, 0.3, 1.0, 2.5):  # from near the identity to strongly anisotropic matrices
        c = scale * torch.randn(m_dim, generator=g, dtype=D64)
        jac = torch.func.jacfwd(lambda cc: torch.linalg.matrix_exp(sym_from_coords(cc, n)))(c)  # (n, n, m)
        x = torch.linalg.matrix_exp(sym_from_coords(c, n))
        cols = [jac[..., i][None] for i in range(m_dim)]
        log_jac = 0.5 * torch.linalg.slogdet(gram(SPD, x[None], cols)[0])[1]
        gauss = (
            -0.5 * float(c.square().sum()) / sigma**2 - m_dim * math.log(sigma) - 0.5 * m_dim * math.log(2 * math.pi)
        )
        expected = gauss - log_jac
        torch.testing.assert_close(SPD.base_log_prob(x[None])[0], expected, atol=1e-10, rtol=0)


def test_spd_base_density_integrates_to_one_and_is_what_random_base_draws() -> None:
    """Quadrature over a global chart of 2x2 SPD matrices with the volume ``sqrt det G`` of the metric itself; the
    second moments of ``log X`` match the tangent Gaussian (``sigma^2`` on the diagonal, ``sigma^2 / 2`` off it) and
    a non-polynomial statistic (``tr X``) matches the mean over ``random_base`` samples."""
    X, dX, cell = log_cholesky_grid(56)
    dvol = torch.linalg.det(gram(SPD, X, dX)).sqrt() * cell
    w = base_log_prob(SPD, X).exp() * dvol
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)  # measured 1 - 6e-8
    logx = spd_log(X)
    s2 = SPD.base_std**2
    assert float((w * logx[:, 0, 0].square()).sum()) == pytest.approx(s2, rel=1e-5)
    assert float((w * logx[:, 0, 1].square()).sum()) == pytest.approx(s2 / 2, rel=1e-5)
    trace = X.diagonal(dim1=-2, dim2=-1).sum(-1)
    samples = SPD.random_base((200_000, 2, 2), torch.Generator().manual_seed(0), dtype=D64)
    tr_s = samples.diagonal(dim1=-2, dim2=-1).sum(-1)
    se = float(tr_s.std()) / math.sqrt(tr_s.numel())
    assert abs(float((w * trace).sum()) - float(tr_s.mean())) < 4 * se, (float((w * trace).sum()), float(tr_s.mean()))


def test_spd_log_volume_density_closed_form_equals_the_generic_gram_construction() -> None:
    for n in (2, 3):
        x = SPD.random_base((7, n, n), torch.Generator().manual_seed(n), dtype=D64)
        torch.testing.assert_close(SPD.log_volume_density(x), Manifold.log_volume_density(SPD, x))


def test_log_sinhc_is_accurate_from_zero_to_large_arguments() -> None:
    a = torch.tensor([0.0, 1e-8, 1e-5, 9.9e-5, 1.01e-4, 1e-3, 0.5, 3.0, 40.0, 800.0], dtype=D64)
    mp = [0.0, 1e-16 / 6, 1e-10 / 6]  # a^2/6 to double precision for tiny a
    ref = torch.tensor(
        mp + [math.log(math.sinh(v) / v) for v in (9.9e-5, 1.01e-4, 1e-3, 0.5, 3.0, 40.0)] + [800 - math.log(1600)],
        dtype=D64,
    )
    torch.testing.assert_close(log_sinhc(a), ref, atol=1e-15, rtol=1e-12)
    torch.testing.assert_close(log_sinhc(-a), log_sinhc(a))
    aa = a.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_sinhc(aa).sum(), aa)
    assert bool(torch.isfinite(grad).all()) and float(grad[0]) == 0.0


# ----------------------------------------------------------------------------------------------- Lorentz base density
def polar_hyperboloid(r: torch.Tensor, directions: torch.Tensor, k: float) -> torch.Tensor:
    """``exp_o(r w)`` on ``<x, x>_L = -k`` written out: ``(s cosh(r/s), s sinh(r/s) w)``, ``s = sqrt k``."""
    s = math.sqrt(k)
    return torch.cat([(s * torch.cosh(r / s))[..., None], (s * torch.sinh(r / s))[..., None] * directions], -1)


@pytest.mark.parametrize("d,k", [(2, 1.0), (2, 2.0), (3, 1.0), (3, 0.5)])
def test_lorentz_base_density_integrates_to_one_and_is_what_random_base_draws(d: int, k: float) -> None:
    """Geodesic polar coordinates: volume ``(s sinh(r/s))^(d-1) dr dOmega``; the density is radial, so a random set of
    directions checks isotropy and the radial quadrature the normalisation and ``E r^2`` against samples."""
    m = GeooptManifold(geoopt.Lorentz(k=k), base_std=0.6)
    s = math.sqrt(k)
    nr, rmax = 4000, 8.0
    r = (torch.arange(nr, dtype=D64) + 0.5) * rmax / nr
    g = torch.Generator().manual_seed(d)
    w = torch.randn(5, d, generator=g, dtype=D64)
    w = w / w.norm(dim=-1, keepdim=True)
    x = polar_hyperboloid(r[:, None].expand(nr, 5), w[None].expand(nr, 5, d), k)
    lp = m.base_log_prob(x)  # (nr, 5)
    torch.testing.assert_close(lp, lp[:, :1].expand_as(lp))  # isotropic
    sphere_area = 2 * math.pi if d == 2 else 4 * math.pi
    radial = lp[:, 0].exp() * (s * torch.sinh(r / s)) ** (d - 1) * (rmax / nr) * sphere_area
    assert float(radial.sum()) == pytest.approx(1.0, abs=1e-6)
    samples = m.random_base((100_000, d + 1), torch.Generator().manual_seed(1), dtype=D64)
    r_s = m.dist(polar_hyperboloid(torch.zeros(1, dtype=D64), torch.zeros(1, d, dtype=D64), k), samples)
    assert float((radial * r * r).sum()) == pytest.approx(d * 0.36, rel=1e-6)  # |v|^2 of N(0, 0.36 I_d)
    se = float((r_s**2).std()) / math.sqrt(r_s.numel())
    assert abs(float((r_s**2).mean()) - d * 0.36) < 4 * se


def test_lorentz_base_density_equals_the_poincare_one_through_the_isometry() -> None:
    """The ball's wrapped normal of std ``s`` (ball coordinates; Riemannian ``2 s``) is the hyperboloid's of std
    ``2 s``: densities w.r.t. the Riemannian volume agree at corresponding points (curvature ``-c``, ``k = 1/c``)."""
    for c in (1.0, 0.5):
        ds = LorentzWrappedNormalMixture(curvature=c, base_std=0.8)
        ball = GeooptManifold(geoopt.PoincareBall(c=c), base_std=0.4)
        y = ball.random_base((64, 2), torch.Generator().manual_seed(2), dtype=D64) * 1.5
        y = ball.projx(y)
        torch.testing.assert_close(ds.manifold.base_log_prob(ds.to_hyperboloid(y)), ball.base_log_prob(y))
        y2 = ball.projx(torch.roll(y, 1, 0))
        # and the map is an isometry (distances agree), so the comparison is between the same geometry
        torch.testing.assert_close(
            ds.manifold.dist(ds.to_hyperboloid(y), ds.to_hyperboloid(y2)), ball.dist(y, y2), atol=0, rtol=1e-6
        )


# ----------------------------------------------------------------------------------------------- likelihoods
def lorentz_generator() -> torch.Tensor:
    """An element of so(1, 2) (``K^T J + J K = 0``, ``J = diag(-1, 1, 1)``): two boosts and a rotation."""
    return torch.tensor([[0.0, 0.8, 0.3], [0.8, 0.0, -0.5], [0.3, 0.5, 0.0]], dtype=D64)


@pytest.mark.parametrize("transport", ["dlog", "ambient"])
def test_lorentz_likelihood_of_an_isometry_flow_is_the_transported_base_density(transport: str) -> None:
    """``dx/dt = K x`` (Lorentz-group generator) flows by isometries ``expm(t K)``, so ``p_1(x) = p_0(expm(-K) x)``:
    the ambient divergence of ``K x`` on the hyperboloid is not 0, the Minkowski metric's volume correction
    (generic Gram construction) must cancel it."""
    m = GeooptManifold(geoopt.Lorentz(), base_std=0.7)
    K = lorentz_generator()
    J = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=D64))
    torch.testing.assert_close(K.T @ J + J @ K, torch.zeros(3, 3, dtype=D64))
    x = m.random_base((24, 3), torch.Generator().manual_seed(4), dtype=D64)
    expected = m.base_log_prob(x @ torch.linalg.matrix_exp(-K).T)
    errs = [
        float((log_likelihood(lambda z, t: z @ K.T, x, m, steps=n, transport=transport) - expected).abs().max())
        for n in (16, 32)
    ]
    assert errs[1] < 2e-6 and errs[0] / errs[1] > 12, errs  # RK4 converges to the closed form at order ~4
    assert float((expected - m.base_log_prob(x)).abs().max()) > 0.1  # the flow moved the density
    torch.testing.assert_close(log_likelihood(zero, x, m, steps=1), m.base_log_prob(x))


def ball_field(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    shrink = 1 - y.square().sum(-1, keepdim=True)
    return (1 + t[:, None]) * torch.tanh(y.roll(1, dims=-1) - 0.4 * y + 0.2) * shrink


def test_lorentz_likelihood_equals_the_poincare_ball_one_through_the_isometry() -> None:
    """A nonlinear time-dependent flow on the ball (whose likelihoods are checked by quadrature in
    test_likelihood.py), pushed to the hyperboloid by the differential of the isometry ``phi``: the log-likelihoods
    agree at corresponding points (Riemannian densities are isometry invariant)."""
    ds = LorentzWrappedNormalMixture(base_std=1.0)  # c = 1
    ball = GeooptManifold(geoopt.PoincareBall(), base_std=0.5)

    def lorentz_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = ds.to_ball(x)
        w = ball_field(y, t)
        y2, yw = y.square().sum(-1, keepdim=True), (y * w).sum(-1, keepdim=True)
        den = 1 - y2  # d/de of (1 + |y|^2, 2 y) / (1 - |y|^2) along w
        num = torch.cat([1 + y2, 2 * y], -1)
        dnum = torch.cat([2 * yw, 2 * w], -1)
        return dnum / den + num * 2 * yw / den.square()

    y = ball.random_base((24, 2), torch.Generator().manual_seed(5), dtype=D64)
    ref = log_likelihood(ball_field, y, ball, steps=40, method="rk4", transport="ambient")
    lp = log_likelihood(lorentz_field, ds.to_hyperboloid(y), ds.manifold, steps=40, method="rk4")
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)  # measured 1.6e-6: the two solvers' discretisation
    assert float((ref - ball.base_log_prob(y)).abs().max()) > 0.1


@pytest.mark.parametrize("transport", ["dlog", "ambient"])
def test_spd_likelihood_of_a_congruence_flow_is_the_transported_base_density(transport: str) -> None:
    """``dX/dt = B X + X B^T`` flows by congruences ``e^{tB} X e^{tB^T}``, isometries of the affine-invariant
    metric, so ``p_1(X) = p_0(e^{-B} X e^{-B^T})``; its ambient divergence on the symmetric matrices is
    ``(n + 1) tr B``, which the volume correction ``-(n+1)/2 log det X`` must cancel."""
    for n in (2, 3):
        g = torch.Generator().manual_seed(10 + n)
        B = 0.4 * torch.randn(n, n, generator=g, dtype=D64) + 0.3 * torch.eye(n, dtype=D64)
        x = SPD.random_base((12, n, n), g, dtype=D64)
        Ai = torch.linalg.matrix_exp(-B)
        expected = SPD.base_log_prob(Ai @ x @ Ai.T)
        errs = [
            float(
                (log_likelihood(lambda z, t, B=B: B @ z + z @ B.T, x, SPD, steps=k, transport=transport) - expected)
                .abs()
                .max()
            )
            for k in (16, 32)
        ]
        assert errs[1] < 2e-5 and errs[0] / errs[1] > 12, errs  # RK4 converges to the closed form at order ~4
        assert float((expected - SPD.base_log_prob(x)).abs().max()) > 0.1
        torch.testing.assert_close(log_likelihood(zero, x, SPD, steps=1), SPD.base_log_prob(x))


def spd_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Nonlinear, time dependent, of the form ``W X + X W^T`` so that steps stay well inside the cone."""
    W = 0.3 * torch.tanh(x.roll(1, dims=-1) - 0.5 * x + t[:, None, None])
    return W @ x + x @ W.transpose(-1, -2)


def test_spd_flow_density_integrates_to_one_and_transports_agree() -> None:
    X, dX, cell = log_cholesky_grid(24, lo=-2.6, hi=2.6, qmax=4.0)
    dvol = torch.linalg.det(gram(SPD, X, dX)).sqrt() * cell
    lp = log_likelihood(spd_field, X, SPD, steps=8, method="rk4", transport="ambient")
    assert float((lp.exp() * dvol).sum()) == pytest.approx(1.0, abs=1e-3)  # measured 0.99996
    assert float((lp - base_log_prob(SPD, X)).abs().max()) > 1.0  # far from the base density
    x = SPD.random_base((16, 2, 2), torch.Generator().manual_seed(6), dtype=D64)
    ref = log_likelihood(spd_field, x, SPD, steps=200, method="rk4", transport="ambient")
    for transport in ("ambient", "dlog"):
        assert float((log_likelihood(spd_field, x, SPD, steps=40, transport=transport) - ref).abs().max()) < 1e-6


# ----------------------------------------------------------------------------------------------- toy datasets
def test_spd_toy_density_integrates_to_one_and_matches_its_samples() -> None:
    ds = build_toy_dataset("spd_wrapped_normal")
    assert isinstance(ds, SPDWrappedNormalMixture) and ds.point_shape == (2, 2)
    X, dX, cell = log_cholesky_grid(56, lo=-2.0, hi=2.0, qmax=3.5)
    w = ds.log_prob(X).exp() * torch.linalg.det(gram(ds.manifold, X, dX)).sqrt() * cell
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)  # measured 1 - 6e-10
    samples = ds.sample(100_000, torch.Generator().manual_seed(0), dtype=D64)
    assert float(ds.manifold.point_error(samples).max()) < 1e-12
    for stat in (lambda z: spd_log(z)[:, 0, 1], lambda z: z.diagonal(dim1=-2, dim2=-1).sum(-1)):
        sv = stat(samples)
        se = float(sv.std()) / math.sqrt(sv.numel())
        assert abs(float((w * stat(X)).sum()) - float(sv.mean())) < 4 * se + 1e-3


def test_lorentz_toy_is_the_poincare_toy_through_the_isometry() -> None:
    ds = build_toy_dataset("lorentz_wrapped_normal")
    ball = build_toy_dataset("poincare_wrapped_normal")
    x = ds.sample(500, torch.Generator().manual_seed(0), dtype=D64)
    assert float(ds.manifold.point_error(x).max()) < 1e-12
    torch.testing.assert_close(ds.log_prob(x), ball.log_prob(ds.to_ball(x)))
    torch.testing.assert_close(ds.to_ball(ds.to_hyperboloid(ds.to_ball(x))), ds.to_ball(x))
    # same samples as the ball's, carried over
    y = ball.sample(50, torch.Generator().manual_seed(3), dtype=D64)
    torch.testing.assert_close(ds.sample(50, torch.Generator().manual_seed(3), dtype=D64), ds.to_hyperboloid(y))


def test_spd_plot_chart_is_the_traceless_part_of_the_matrix_log() -> None:
    c = torch.tensor([[0.3, -0.2, 0.5], [1.0, 1.0, -0.7]], dtype=D64)  # orthonormal coordinates of log X
    chart = SPD.chart2d(torch.linalg.matrix_exp(sym_from_coords(c, 2)))
    torch.testing.assert_close(chart.u, (c[:, 0] - c[:, 1]) / math.sqrt(2.0))
    torch.testing.assert_close(chart.v, c[:, 2])  # sqrt 2 (log X)_12 = c_2
    assert chart.disk_radius is None and "log X" in chart.xlabel
