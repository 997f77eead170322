"""Toy datasets: densities normalise (quadrature), samplers match densities (region probabilities, moments)."""

from __future__ import annotations

import math

import pytest
import torch

from manifold_fm.data.toy import (
    TOY_DATASETS,
    PoincareWrappedNormalMixture,
    ProductVMFMixture,
    TorusWrappedNormalMixture,
    VMFMixture,
    build_toy_dataset,
    vmf_log_density,
    vmf_sample,
)

from helpers import sphere_grid

D64 = torch.float64


def torus_grid(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    a = (torch.arange(n, dtype=D64) + 0.5) * 2 * math.pi / n - math.pi
    X, Y = torch.meshgrid(a, a, indexing="ij")
    return torch.stack([X, Y], -1).reshape(-1, 2), torch.full((n * n,), (2 * math.pi / n) ** 2, dtype=D64)


def disk_grid(nr: int = 300, nphi: int = 96, rmax: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Geodesic polar coordinates around 0 on the Poincare disk (c = 1): hyperbolic area sinh(r) dr dphi."""
    r = (torch.arange(nr, dtype=D64) + 0.5) * rmax / nr
    phi = (torch.arange(nphi, dtype=D64) + 0.5) * 2 * math.pi / nphi
    R, P = torch.meshgrid(r, phi, indexing="ij")
    x = (torch.tanh(R / 2)[..., None] * torch.stack([torch.cos(P), torch.sin(P)], -1)).reshape(-1, 2)
    return x, (torch.sinh(R) * (rmax / nr) * (2 * math.pi / nphi)).reshape(-1)


GRIDS = {"vmf": lambda: sphere_grid(200), "torus_wrapped_normal": torus_grid, "poincare_wrapped_normal": disk_grid}


@pytest.mark.parametrize("name", list(GRIDS))
def test_density_normalises_and_matches_sampler(name: str) -> None:
    ds = build_toy_dataset(name)
    x, w = GRIDS[name]()
    p = ds.log_prob(x).exp()
    assert abs(float((p * w).sum()) - 1.0) < 2e-3
    # probability of the half-space x_0 > 0: quadrature vs samples (binomial standard error ~0.0035)
    s = ds.sample(20000, torch.Generator().manual_seed(0), dtype=D64)
    assert float(ds.manifold.point_error(s).max()) < 1e-12
    quad = float((p * w * (x[:, 0] > 0)).sum())
    assert abs(float((s[:, 0] > 0).double().mean()) - quad) < 0.015
    # entropy: sample average vs quadrature -int p log p
    ent_quad = float(-(p * w * torch.log(p.clamp_min(1e-300))).sum())
    assert abs(ds.entropy(20000, torch.Generator().manual_seed(1)) - ent_quad) < 0.05


def test_vmf_sampler_moment_and_density_closed_form() -> None:
    mu = torch.tensor([[0.0, 0.6, 0.8]], dtype=D64).expand(40000, 3)
    for kappa in (0.5, 5.0, 50.0):
        x = vmf_sample(mu, torch.full((40000,), kappa, dtype=D64), torch.Generator().manual_seed(2))
        mean_cos = float((x * mu).sum(-1).mean())
        assert abs(mean_cos - (1 / math.tanh(kappa) - 1 / kappa)) < 0.01  # E<mu, x> = coth k - 1/k
    x = torch.tensor([[0.0, 0.0, 1.0]], dtype=D64)
    k = torch.tensor(3.0, dtype=D64)
    ref = math.log(3.0 / (4 * math.pi * math.sinh(3.0))) + 3.0 * 0.8
    assert abs(float(vmf_log_density(x, mu[:1], k)) - ref) < 1e-12


def test_product_vmf_factorises_for_one_component() -> None:
    ds = ProductVMFMixture(spheres=3, components=1, kappa=4.0, seed=3)
    x = ds.sample(50, torch.Generator().manual_seed(4), dtype=D64)
    assert x.shape == (50, 3, 3)
    ref = sum(vmf_log_density(x[:, j], ds.means[0, j], ds.kappa) for j in range(3))
    torch.testing.assert_close(ds.log_prob(x), ref)
    # sampled per-sphere mean direction matches the component mean (E x = (coth k - 1/k) mu)
    mean = ds.sample(20000, torch.Generator().manual_seed(5), dtype=D64).mean(0)
    torch.testing.assert_close(mean, (1 / math.tanh(4.0) - 0.25) * ds.means[0], atol=0.02, rtol=0)


def test_mixture_parameters_and_errors() -> None:
    assert set(TOY_DATASETS) == {
        "vmf",
        "product_vmf",
        "torus_wrapped_normal",
        "poincare_wrapped_normal",
        "lorentz_wrapped_normal",
        "spd_wrapped_normal",
    }
    ds = VMFMixture(means=[[1, 0, 0], [0, 1, 0]], kappas=[2.0, 3.0], weights=[1.0, 3.0])
    assert torch.allclose(ds.log_w.exp(), torch.tensor([0.25, 0.75], dtype=D64))
    with pytest.raises(ValueError, match="positive"):
        VMFMixture(kappas=[1.0, -1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        TorusWrappedNormalMixture(weights=[1.0])
    with pytest.raises(ValueError, match="inside the ball"):
        PoincareWrappedNormalMixture(means=[[0.9, 0.9]])
    with pytest.raises(ValueError, match="symmetric matrices"):
        build_toy_dataset("spd_wrapped_normal", log_means=[[[0.0, 1.0], [0.0, 0.0]]])
    with pytest.raises(ValueError, match="unknown toy dataset"):
        build_toy_dataset("moons")
    with pytest.raises(ValueError, match="expected points"):
        ds.log_prob(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="positive integer"):
        ds.sample(0)
