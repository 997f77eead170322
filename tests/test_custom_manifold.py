"""Bring your own manifold, for real: SO(3) as rotation matrices, defined in this file only (the library does not ship
it), trains a flow through the library's one trainer, samples with every fixed-step and adaptive solver, computes
log-likelihoods (against the known density of its data and against a second algorithm), and trains with OT coupling.

Nothing under ``manifold_fm/`` knows SO(3): everything below goes through the :class:`Manifold` extension points and
their generic defaults (forward-mode ``dlogmap``, the SVD tangent basis, the induced-metric volume density, the
per-pair cost matrix).

Geometry: ``SO(3) = {R : R^T R = I, det R = 1}`` in ``R^{3x3}`` with the Frobenius metric. ``T_R = {R W : W skew}``;
``|R hat(w)|_F^2 = 2 |w|^2``, so this metric is ``sqrt 2`` times the usual ``|w|`` one and the volume of SO(3) is
``(sqrt 2)^3 * 8 pi^2 = 16 sqrt(2) pi^2``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from manifold_fm.coupling import IndependentCoupling, OTCoupling
from manifold_fm.data.sources import SamplerSource
from manifold_fm.flow import Flow
from manifold_fm.likelihood import log_likelihood
from manifold_fm.manifolds import Manifold
from manifold_fm.manifolds.testing import check_manifold
from manifold_fm.models import VelocityMLP
from manifold_fm.paths import GeodesicPath
from manifold_fm.sampler import SamplerSpec, generate, model_velocity
from manifold_fm.solvers import FIXED_METHODS, adaptive_methods, integrate
from manifold_fm.training.checkpoint import load_checkpoint
from manifold_fm.training.flow_objective import FlowObjective
from manifold_fm.training.schema import OptimConfig, TrainConfig
from manifold_fm.training.trainer import Trainer

D64 = torch.float64
LOG_VOLUME = math.log(16 * math.sqrt(2) * math.pi**2)


def hat(w: Tensor) -> Tensor:
    """``(..., 3) -> (..., 3, 3)``: the skew matrix with ``hat(w) v = w x v``."""
    z = torch.zeros_like(w[..., 0])
    rows = [(z, -w[..., 2], w[..., 1]), (w[..., 2], z, -w[..., 0]), (-w[..., 1], w[..., 0], z)]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def vee(m: Tensor) -> Tensor:
    """The inverse of :func:`hat` on the skew part of ``m``."""
    return torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1) / 2


class SO3(Manifold):
    """Rotation matrices, points of shape ``(..., 3, 3)``; the five required methods, ``transp`` and the prior's
    density. Nothing else: every engine extension point uses its generic default."""

    name = "so3"
    point_ndim = 2

    def projx(self, x: Tensor) -> Tensor:
        """The closest rotation to ``x`` with ``det x > 0``: its orthogonal polar factor, by Newton's iteration
        ``X <- (X + X^{-T}) / 2`` (quadratic convergence; differentiable, unlike an SVD at repeated singular values)."""
        for _ in range(12):
            x = 0.5 * (x + torch.linalg.inv(x).transpose(-1, -2))
        return x

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        w = x.transpose(-1, -2) @ u
        return x @ ((w - w.transpose(-1, -2)) / 2)

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        w = x.transpose(-1, -2) @ u
        return x @ torch.linalg.matrix_exp((w - w.transpose(-1, -2)) / 2)

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        """``x hat(theta n)`` for ``x^T y`` the rotation by ``theta`` about ``n``; the angle from an atan2 of the
        skew part (``sin theta n``) and the trace (``1 + 2 cos theta``), well conditioned near 0."""
        r = x.transpose(-1, -2) @ y
        s = vee(r)
        sin = s.norm(dim=-1)
        cos = (r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
        theta = torch.atan2(sin, cos)
        small = sin < 1e-6
        ratio = torch.where(small, 1.0 + theta**2 / 6, theta / torch.where(small, 1.0, sin))
        return x @ hat(ratio.unsqueeze(-1) * s)

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """Along ``x exp(t W)`` (bi-invariant metric): ``y exp(-W/2) (x^T v) exp(W/2)``."""
        half = torch.linalg.matrix_exp(0.5 * (x.transpose(-1, -2) @ self.logmap(x, y)))
        return y @ half.transpose(-1, -2) @ (x.transpose(-1, -2) @ v) @ half

    def random_base(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Haar-uniform rotations, from uniform unit quaternions."""
        q = torch.randn((*shape[:-2], 4), generator=generator, dtype=dtype or torch.get_default_dtype(), device=device)
        a, b, c, d = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
        rows = [
            (1 - 2 * (c * c + d * d), 2 * (b * c - a * d), 2 * (b * d + a * c)),
            (2 * (b * c + a * d), 1 - 2 * (b * b + d * d), 2 * (c * d - a * b)),
            (2 * (b * d - a * c), 2 * (c * d + a * b), 1 - 2 * (b * b + c * c)),
        ]
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    def base_log_prob(self, x: Tensor) -> Tensor:
        """Uniform: minus the log of the volume of SO(3) in this metric."""
        return torch.full(x.shape[:-2], -LOG_VOLUME, dtype=x.dtype, device=x.device)


M = SO3()
MEAN = torch.linalg.matrix_exp(hat(torch.tensor([0.3, -1.2, 0.8], dtype=D64)))
SIGMA = 0.4


def sample_data(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A wrapped normal: ``MEAN exp(hat(sigma e))``, ``e ~ N(0, I_3)``."""
    e = torch.randn(n, 3, generator=generator, dtype=D64)
    return (MEAN @ torch.linalg.matrix_exp(hat(SIGMA * e))).float()


def data_log_prob(x: Tensor) -> Tensor:
    """Its density w.r.t. this metric's volume: with ``w = vee(log(MEAN^T x))``, ``theta = |w|``, the Gaussian of
    ``w`` over the exponential map's volume factor ``2 (1 - cos theta) / theta^2`` (|w| metric), over ``2 sqrt 2``
    (the Frobenius metric's volume is ``(sqrt 2)^3`` times the |w| one). Wrapping beyond ``theta = pi`` has
    probability below 1e-20 at ``sigma = 0.4``, so it is left out."""
    x = x.double()
    w = vee(MEAN.T @ M.logmap(MEAN.expand_as(x), x))  # the rotation vector of MEAN^T x
    theta = w.norm(dim=-1)
    gauss = -0.5 * w.square().sum(-1) / SIGMA**2 - 1.5 * math.log(2 * math.pi * SIGMA**2)
    jac = torch.where(theta > 1e-4, 2 * (1 - torch.cos(theta)) / theta.clamp_min(1e-4) ** 2, 1 - theta**2 / 12)
    return gauss - torch.log(jac) - 1.5 * math.log(2.0)


def so3_error(x: Tensor) -> float:
    """``max |R^T R - I|`` and ``|det R - 1|``: how far from SO(3)."""
    eye = torch.eye(3, dtype=x.dtype)
    return max(float((x.transpose(-1, -2) @ x - eye).abs().max()), float((torch.linalg.det(x) - 1).abs().max()))


def _train(out: Path, steps: int, coupling: object = None, stop_after: int | None = None) -> Trainer:
    flow = Flow(M, GeodesicPath(M), coupling=coupling or IndependentCoupling(), name="so3")
    torch.manual_seed(0)
    model = VelocityMLP((3, 3), hidden=128, depth=3)
    train = TrainConfig(
        steps=steps,
        batch_size=256,
        ema_decay=0.0,
        checkpoint_every=stop_after or 10_000,
        log_every=50,
        class_dropout=0.0,
    )
    optim = OptimConfig(lr=2e-3, schedule="cosine", warmup_steps=30, min_lr_ratio=0.05, grad_clip=None)
    return Trainer(
        FlowObjective(model, flow, optim),
        SamplerSource(sample_data),
        train,
        out,
        device="cpu",
        progress=False,
        fingerprint={"optim": optim.model_dump()},
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    trainer = _train(tmp_path_factory.mktemp("so3"), 600)
    trainer.fit()
    return trainer


def test_so3_passes_the_manifold_contract() -> None:
    g = torch.Generator().manual_seed(0)
    x0, x1 = M.random_base((64, 3, 3), g, D64), M.random_base((64, 3, 3), g, D64)
    check_manifold(M, x0, x1, max_tangent=1.0)
    check_manifold(M, x0.float(), x1.float(), max_tangent=1.0)


def test_generic_extension_points_are_right_on_so3() -> None:
    g = torch.Generator().manual_seed(1)
    x = M.random_base((5, 3, 3), g, D64)
    y = M.expmap(x, M.proju(x, 0.7 * torch.randn(5, 3, 3, generator=g, dtype=D64)))
    v = M.proju(y, torch.randn(5, 3, 3, generator=g, dtype=D64))
    h = 1e-6  # d(log_x) at y against a central difference along the geodesic through y with velocity v
    fd = (M.logmap(x, M.expmap(y, h * v)) - M.logmap(x, M.expmap(y, -h * v))) / (2 * h)
    torch.testing.assert_close(M.dlogmap(x, y, v), fd, atol=1e-8, rtol=1e-7)
    basis = M.tangent_basis(x)  # (5, 3, 3, 3): three orthonormal tangent matrices per point
    assert basis.shape == (5, 3, 3, 3)
    gram = torch.einsum("bimn,bjmn->bij", basis, basis)
    torch.testing.assert_close(gram, torch.eye(3, dtype=D64).expand(5, 3, 3), atol=1e-12, rtol=0)
    torch.testing.assert_close(M.proju(x.unsqueeze(1).expand_as(basis), basis), basis, atol=1e-12, rtol=0)
    u = torch.randn(5, 3, 3, generator=g, dtype=D64)
    torch.testing.assert_close(M.orthogonal_proju(x, u), M.proju(x, u), atol=1e-12, rtol=0)  # proju is orthogonal
    torch.testing.assert_close(M.log_volume_density(x), torch.zeros(5, dtype=D64))  # the induced metric
    cost = M.pairwise_sq_dist(x, y[:3])
    loop = torch.tensor([[float(M.dist(a, b)) ** 2 for b in y[:3]] for a in x], dtype=D64)
    torch.testing.assert_close(cost, loop, atol=1e-12, rtol=0)


def test_the_volume_constant_by_the_weyl_integration_formula() -> None:
    """An independent derivation of ``16 sqrt(2) pi^2``: integrate the exponential map's volume factor over the
    ball of rotation vectors, ``int_0^pi 4 pi theta^2 2 (1 - cos theta) / theta^2 dtheta``, times ``2 sqrt 2``."""
    theta = torch.linspace(0, math.pi, 200_001, dtype=D64)
    integrand = 4 * math.pi * 2 * (1 - torch.cos(theta))
    volume = 2 * math.sqrt(2) * float(torch.trapezoid(integrand, theta))
    assert volume == pytest.approx(math.exp(LOG_VOLUME), rel=1e-9)


def test_likelihood_of_a_measure_preserving_flow_is_the_uniform_density() -> None:
    """A left-invariant field ``x hat(w(t))`` preserves the Haar measure: the density stays ``1 / vol``."""

    def spin(x: Tensor, t: Tensor) -> Tensor:
        w = torch.stack([torch.sin(3 * t), torch.cos(2 * t), t], -1).to(x.dtype)
        return x @ hat(w)

    x = M.random_base((6, 3, 3), torch.Generator().manual_seed(2), D64)
    for method in ("exact", "hutchinson"):
        lp = log_likelihood(spin, x, M, steps=8, method="rk4", divergence_method=method, generator=torch.Generator())
        torch.testing.assert_close(lp, torch.full((6,), -LOG_VOLUME, dtype=D64), atol=1e-9, rtol=0)


def test_trained_flow_likelihood_matches_the_known_density(trained: Trainer) -> None:
    test = sample_data(200, torch.Generator().manual_seed(5))
    true_nll = float(-data_log_prob(test).mean())
    lp = log_likelihood(model_velocity(trained.ema.model, SamplerSpec()), test, M, steps=16, method="rk4")
    gap = float(-lp.mean()) - true_nll
    assert abs(gap) < 0.15, (float(-lp.mean()), true_nll)
    untrained = VelocityMLP((3, 3), hidden=128, depth=3)  # near the uniform prior: NLL ~ log vol = 5.41
    lp0 = log_likelihood(model_velocity(untrained, SamplerSpec()), test, M, steps=16, method="rk4")
    assert float(-lp0.mean()) - true_nll > 2.0


def test_likelihood_equals_the_jacobian_of_the_flow_map(trained: Trainer) -> None:
    """A second algorithm: the change of variables through the discrete flow map itself. With ``Phi`` the map from
    data (t=1) back to noise (t=0) by RK4 (ambient stages, differentiable end to end),
    ``log p_1(x) = log p_0(Phi(x)) + log |det dPhi(x)|``, the determinant taken by autograd in exponential
    coordinates ``x exp(hat(a)) -> Phi(x) exp(hat(b))`` (normal coordinates at both ends, so the metric factors
    cancel; ``b = vee(Phi(x)^T end) + O(|b|^3)``). No divergence is computed."""
    model = trained.ema.model.double()
    try:
        velocity = model_velocity(model, SamplerSpec())
        x = sample_data(2, torch.Generator().manual_seed(6)).double()
        # the same time grid for both (the network's time features oscillate fast in t, so the two are compared as
        # two discretisations on one grid, which agree to O(h^4), rather than each against the continuous flow)
        lp = log_likelihood(velocity, x, M, steps=64, method="rk4")
        for i in range(2):
            xi = x[i : i + 1]
            flow_map = dict(t0=1.0, t1=0.0, steps=64, method="rk4", transport="ambient")
            x0 = integrate(velocity, xi, M, **flow_map)

            def coords(a: Tensor, xi: Tensor = xi, x0: Tensor = x0, flow_map: dict = flow_map) -> Tensor:
                end = integrate(velocity, xi @ torch.linalg.matrix_exp(hat(a)), M, **flow_map)
                return vee(x0[0].T @ end[0])

            jac = torch.autograd.functional.jacobian(coords, torch.zeros(3, dtype=D64))
            reference = -LOG_VOLUME + torch.linalg.slogdet(jac)[1]
            assert float(lp[i]) == pytest.approx(float(reference), abs=2e-5)
    finally:
        model.float()


@pytest.fixture(scope="module")
def noise_and_reference(trained: Trainer) -> tuple[Tensor, Tensor]:
    """Prior samples and where a fine float64 RK4 (200 steps) takes them under the trained flow."""
    noise = M.random_base((8, 3, 3), torch.Generator().manual_seed(7))
    velocity = model_velocity(trained.ema.model, SamplerSpec())
    with torch.no_grad():
        reference = integrate(
            lambda x, t: velocity(x.float(), t.float()).double(), noise.double(), M, steps=200, method="rk4"
        )
    return noise, reference.float()


@pytest.mark.parametrize("method", [*FIXED_METHODS, *adaptive_methods()])
def test_every_solver_samples_on_so3(trained: Trainer, noise_and_reference: tuple[Tensor, Tensor], method: str) -> None:
    """Every solver, through the library's sampler, keeps samples on SO(3), lands near a fine RK4 reference (the
    trained field oscillates fast in t, so few-step solvers are loose: their order is tested on a smooth field
    below), and moves the noise onto the data: the samples sit near the data's mean rotation."""
    noise, reference = noise_and_reference
    fixed = method in FIXED_METHODS
    spec = SamplerSpec(method=method, steps=20 if fixed else 2, atol=2e-4, rtol=2e-4)
    flow = trained.objective.flow
    out = generate(trained.ema.model, flow, (8, 3, 3), spec, generator=torch.Generator().manual_seed(7))
    assert torch.equal(flow.prior((8, 3, 3), torch.Generator().manual_seed(7)), noise)  # the same noise
    assert so3_error(out) < 1e-5
    # a broken solver misses by O(1) (noise and data are ~2 apart); first-order euler and fehlberg2 are the loosest
    bound = {"euler": 0.2, "fehlberg2": 0.15}.get(method, 0.06)
    assert float((out - reference).abs().max()) < bound
    to_mean = M.dist(MEAN.float().expand_as(out), out).mean()
    assert float(to_mean) < 0.5 * float(M.dist(MEAN.float().expand_as(noise), noise).mean())


def test_exp_map_runge_kutta_keeps_its_order_on_so3() -> None:
    """On a smooth time-dependent field, errors against a fine reference fall at the method's classical order."""
    c = torch.tensor([[0.2, -0.5, 0.1], [0.4, 0.0, -0.3], [-0.2, 0.6, 0.1]], dtype=D64)

    def field(x: Tensor, t: Tensor) -> Tensor:
        return (c * (1 + t.view(-1, 1, 1))) @ x + x @ hat(torch.stack([t, 1 - t, torch.sin(2 * t)], -1))

    x0 = M.random_base((2, 3, 3), torch.Generator().manual_seed(8), D64)
    reference = integrate(field, x0, M, steps=256, method="rk4")
    for method, order in (("euler", 1), ("heun", 2), ("midpoint", 2), ("rk4", 4)):
        errs = [float((integrate(field, x0, M, steps=n, method=method) - reference).abs().max()) for n in (8, 16, 32)]
        rates = [math.log2(a / b) for a, b in itertools.pairwise(errs)]
        assert all(abs(r - order) < 0.3 for r in rates), (method, errs, rates)


def test_ot_coupling_on_so3_is_optimal_and_trains_and_resumes_exactly(tmp_path: Path) -> None:
    ot = OTCoupling(M)
    g = torch.Generator().manual_seed(9)
    x0, x1 = M.random_base((6, 3, 3), g), sample_data(6, g)
    paired, _, _ = ot.pair(x0, x1)
    cost = float(M.dist(paired, x1).square().sum())
    brute = min(float(M.dist(x0[list(p)], x1).square().sum()) for p in itertools.permutations(range(6)))
    assert cost == pytest.approx(brute, rel=1e-6)
    full = _train(tmp_path / "full", 20, coupling=ot, stop_after=10)
    full.fit()
    assert math.isfinite(full.last_loss)

    class Interrupt(Exception):
        pass

    part = _train(tmp_path / "part", 20, coupling=ot, stop_after=10)
    part.hooks = []
    original = part.train_step

    def step_until_15(*args: object) -> object:
        if part.step == 15:
            raise Interrupt
        return original(*args)

    part.train_step = step_until_15  # type: ignore[method-assign]
    with pytest.raises(Interrupt):
        part.fit()
    resumed = _train(tmp_path / "part", 20, coupling=ot, stop_after=10)
    resumed.fit(resume=True)
    a, b = load_checkpoint(tmp_path / "full" / "checkpoints"), load_checkpoint(tmp_path / "part" / "checkpoints")
    assert a.step == b.step == 20 and all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    # a resume, not a restart: the second process started at the step-10 checkpoint and ran steps 11-20 only
    assert b.meta["sessions"] == [{"start": 0, "steps": 10}, {"start": 10, "steps": 10}]
