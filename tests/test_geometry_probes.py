"""Geometry diagnostics (known answers) and the component-swap probe."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from manifold_fm.eval.geometry import path_diagnostics, token_norm_stats
from manifold_fm.eval.probes import component_swap_probe, same_class_neighbours, swap_hybrids
from manifold_fm.manifolds import TokenSpheres
from manifold_fm.tokenizers import LatentNormalization, Tokenizer


def _chi_mean(d: int) -> float:
    """E|z| for z ~ N(0, I_d): sqrt(2) Gamma((d+1)/2) / Gamma(d/2)."""
    return math.sqrt(2) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))


@pytest.mark.parametrize("d", [16, 64])
def test_gaussian_tokens_radius_and_cv(d: int) -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(64, d, 16, 16, generator=g, dtype=torch.float64)
    s = token_norm_stats(z)
    m = _chi_mean(d)
    cv_exact = math.sqrt(d - m * m) / m
    assert s["d"] == d and s["tokens"] == 64 * 256
    assert s["mean_radius"] == pytest.approx(m, rel=5e-3)
    assert s["mean_radius_over_sqrt_d"] == pytest.approx(1.0, abs=1.0 / (2 * d) + 5e-3)
    assert s["cv"] == pytest.approx(cv_exact, rel=3e-2)
    assert s["cv"] == pytest.approx(1 / math.sqrt(2 * d), rel=0.1)  # the asymptotic form quoted in the issue


def test_norm_stats_axis_last_and_plain_loop() -> None:
    z = torch.randn(3, 5, 7)
    s = token_norm_stats(z, axis=-1)
    r = torch.tensor([math.sqrt(sum(float(v) ** 2 for v in z[b, n])) for b in range(3) for n in range(5)])
    assert s["d"] == 7 and s["tokens"] == 15
    assert s["mean_radius"] == pytest.approx(float(r.double().mean()), rel=1e-6)
    assert s["max"] == pytest.approx(float(r.max()), rel=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        token_norm_stats(torch.full((2, 3, 4), float("nan")))


def test_linear_chord_midpoint_norm_is_sqrt_half_d() -> None:
    d = 256
    sphere = TokenSpheres(d)
    x0 = sphere.random_base((32, d, 4, 4), dtype=torch.float64)
    x1 = sphere.random_base((32, d, 4, 4), dtype=torch.float64)
    out = path_diagnostics(x0, x1, [0.0, 0.5, 1.0], paths=["linear"])
    lin = out["linear"]
    assert lin["norm_mean"][0] == pytest.approx(math.sqrt(d), rel=1e-9)
    assert lin["norm_mean"][1] == pytest.approx(math.sqrt(d / 2), rel=0.02)
    assert lin["shell_deviation"][0] == pytest.approx(0.0, abs=1e-6)
    assert lin["shell_deviation"][1] > 1e3  # far off the (exact, std ~ 0) endpoint spheres


def test_slerp_zero_radial_share_and_shell_deviation() -> None:
    x0 = torch.randn(8, 16, 4, 4, dtype=torch.float64)
    x1 = 3 * torch.randn(8, 16, 4, 4, dtype=torch.float64)
    out = path_diagnostics(x0, x1, torch.linspace(0, 1, 5))
    sl = out["slerp"]
    assert max(sl["radial_share"]) < 1e-20 and max(sl["radial_energy_share"]) < 1e-20
    assert max(sl["shell_deviation"]) < 1e-6
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in sl["norm_mean_over_sqrt_d"])
    # Polar: per-token radius is linear in t, so its mean is the lerp of the endpoint means.
    po = out["polar"]
    r0 = float(torch.linalg.vector_norm(x0, dim=1).mean())
    r1 = float(torch.linalg.vector_norm(x1, dim=1).mean())
    for t, m in zip(out["t"], po["norm_mean"], strict=True):
        assert m == pytest.approx((1 - t) * r0 + t * r1, rel=1e-9)


def test_linear_diagnostics_match_a_plain_loop() -> None:
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    t = 0.3
    out = path_diagnostics(x0, x1, [t], paths=["linear"])["linear"]
    shares, devs = [], []
    r0s = [float(x0[b, :, i, j].norm()) for b in range(2) for i in range(2) for j in range(2)]
    r1s = [float(x1[b, :, i, j].norm()) for b in range(2) for i in range(2) for j in range(2)]
    m0, m1 = sum(r0s) / 8, sum(r1s) / 8
    s0 = math.sqrt(sum((r - m0) ** 2 for r in r0s) / 8)
    s1 = math.sqrt(sum((r - m1) ** 2 for r in r1s) / 8)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                a, c = x0[b, :, i, j].tolist(), x1[b, :, i, j].tolist()
                xt = [(1 - t) * p + t * q for p, q in zip(a, c, strict=True)]
                u = [q - p for p, q in zip(a, c, strict=True)]
                rn = math.sqrt(sum(v * v for v in xt))
                radial = sum(p * q for p, q in zip(u, xt, strict=True)) / rn
                shares.append(radial**2 / sum(v * v for v in u))
                devs.append(min(abs(rn - m0) / s0, abs(rn - m1) / s1))
    assert out["radial_share"][0] == pytest.approx(sum(shares) / 8, rel=1e-9)
    assert out["shell_deviation"][0] == pytest.approx(sum(devs) / 8, rel=1e-9)


def test_path_diagnostics_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        path_diagnostics(torch.randn(2, 3, 4), torch.randn(2, 3, 5), [0.5])
    with pytest.raises(ValueError, match="unknown path"):
        path_diagnostics(torch.randn(2, 3, 4), torch.randn(2, 3, 4), [0.5], paths=["bezier"])


def test_same_class_neighbours_plain_loop() -> None:
    z = torch.randn(12, 4, 2, 2)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 1, 3, 0, 2, 1, 0])
    nb = same_class_neighbours(z, labels)
    for i in range(12):
        cands = [j for j in range(12) if j != i and labels[j] == labels[i]]
        if not cands:
            assert nb[i] == -1
        else:
            best = min(cands, key=lambda j: float((z[i] - z[j]).double().norm()))
            assert int(nb[i]) == best


def test_swap_hybrids_norms_and_directions() -> None:
    za, zb = torch.randn(3, 8, 2, 2, dtype=torch.float64), torch.randn(3, 8, 2, 2, dtype=torch.float64)
    h = swap_hybrids(za, zb)
    ra, rb = za.norm(dim=1), zb.norm(dim=1)
    cos = torch.nn.functional.cosine_similarity
    torch.testing.assert_close(h["radius_swapped"].norm(dim=1), rb)
    torch.testing.assert_close(cos(h["radius_swapped"], za, dim=1), torch.ones_like(ra))
    torch.testing.assert_close(h["direction_swapped"].norm(dim=1), ra)
    torch.testing.assert_close(cos(h["direction_swapped"], zb, dim=1), torch.ones_like(ra))
    flat = h["radius_flattened"].norm(dim=1)
    torch.testing.assert_close(flat, ra.mean(dim=(1, 2), keepdim=True).expand_as(flat))


class _PixelTokenizer(Tokenizer):
    """A weightless test tokenizer: 4x4 pixel unshuffle (d = 48), decode = shuffle; content in norms and angles."""

    def __init__(self) -> None:
        self.latent_channels, self.downsample, self.name = 48, 4, "pixel-shuffle"
        self.normalization = LatentNormalization()
        self._dummy = nn.Linear(1, 1)

    def encode_raw(self, images: Tensor) -> Tensor:
        return torch.nn.functional.pixel_unshuffle(images + 1.5, 4)  # shift so no token is zero

    def decode_raw(self, latents: Tensor) -> Tensor:
        return (torch.nn.functional.pixel_shuffle(latents, 4) - 1.5).clamp(-1, 1)

    def decoder_module(self) -> nn.Module:
        return nn.Identity()

    def modules(self):  # type: ignore[override]
        return (self._dummy,)


def test_swap_probe_identical_neighbour_has_zero_distance() -> None:
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    images = torch.cat([x, x])  # every anchor's nearest same-class neighbour is its exact copy
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    rep = component_swap_probe(_PixelTokenizer(), images, labels, max_pairs=8)
    assert rep["pairs"] == 8 and rep["metric"] == "fallback:grad-pyramid-l1"
    for h in ("neighbour", "radius_swapped", "direction_swapped"):
        assert rep[h]["perceptual_mean"] == pytest.approx(0.0, abs=1e-5)
        assert rep[h]["psnr_mean"] > 90
    assert rep["radius_flattened"]["perceptual_mean"] > 1e-3  # flattening norms does change the pixels here


def test_swap_probe_needs_a_neighbour() -> None:
    with pytest.raises(ValueError, match="same-class neighbour"):
        component_swap_probe(_PixelTokenizer(), torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))
