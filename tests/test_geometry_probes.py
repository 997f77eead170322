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


def test_shell_deviation_profile_matches_a_float64_numpy_recomputation() -> None:
    import numpy as np

    from manifold_fm.eval.geometry import shell_deviation_profile

    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(6, 8, 3, 2, generator=g)
    x1 = 0.6 * torch.randn(6, 8, 3, 2, generator=g) + 0.4
    ts = [0.0, 0.2, 0.5, 0.9, 1.0]
    out = shell_deviation_profile(x0, x1, ts)
    a, b = x0.numpy().astype(np.float64), x1.numpy().astype(np.float64)
    r0, r1 = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)  # (pairs, 3, 2) token norms
    m0, s0, m1, s1 = r0.mean(), r0.std(), r1.mean(), r1.std()
    means, maxes = [], []
    for t in ts:
        r = np.linalg.norm((1 - t) * a + t * b, axis=1)
        dev = np.minimum(np.abs(r - m0) / s0, np.abs(r - m1) / s1).reshape(6, -1).mean(axis=1)
        means.append(dev.mean())
        maxes.append(dev.max())
    assert out["pairs"] == 6 and out["tokens_per_pair"] == 6 and out["d"] == 8
    assert out["mean"] == pytest.approx(means, rel=1e-12)
    assert out["max"] == pytest.approx(maxes, rel=1e-12)
    assert out["shells"]["prior"]["std"] == pytest.approx(s0, rel=1e-12)
    k = int(np.argmax(means))
    assert out["peak_mean"] == pytest.approx(means[k]) and out["peak_mean_t"] == ts[k]
    assert out["peak_max"] == pytest.approx(max(maxes))
    assert "nearest endpoint shell" in out["definition"] and "sigma" in out["definition"]
    # The mean curve is path_diagnostics' linear shell deviation.
    lin = path_diagnostics(x0, x1, ts, paths=["linear"])["linear"]["shell_deviation"]
    assert out["mean"] == pytest.approx(lin, rel=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        shell_deviation_profile(x0, x1[:2], ts)


# ------------------------------------------------------------------------------------------------ DINOv2 distance
def _dinov2_state(dim: int = 128, depth: int = 2, grid: int = 2, registers: int = 2, seed: int = 0) -> dict:
    """A random state dict in facebookresearch/dinov2's ViT layout (patch 14, MLP ratio 4, LayerScale)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, s: float = 0.1) -> Tensor:
        return torch.randn(*shape, generator=g) * s

    st = {
        "patch_embed.proj.weight": r(dim, 3, 14, 14, s=0.05),
        "patch_embed.proj.bias": r(dim),
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, 1 + grid * grid, dim),
        "mask_token": r(1, dim),
        "norm.weight": 1 + r(dim),
        "norm.bias": r(dim),
    }
    if registers:
        st["register_tokens"] = r(1, registers, dim)
    for i in range(depth):
        p = f"blocks.{i}."
        st.update(
            {
                p + "norm1.weight": 1 + r(dim),
                p + "norm1.bias": r(dim),
                p + "attn.qkv.weight": r(3 * dim, dim),
                p + "attn.qkv.bias": r(3 * dim),
                p + "attn.proj.weight": r(dim, dim),
                p + "attn.proj.bias": r(dim),
                p + "ls1.gamma": 0.5 + r(dim),
                p + "norm2.weight": 1 + r(dim),
                p + "norm2.bias": r(dim),
                p + "mlp.fc1.weight": r(4 * dim, dim),
                p + "mlp.fc1.bias": r(4 * dim),
                p + "mlp.fc2.weight": r(dim, 4 * dim),
                p + "mlp.fc2.bias": r(dim),
                p + "ls2.gamma": 0.5 + r(dim),
            }
        )
    return st


def _dinov2_reference(st: dict, images: Tensor, pos: Tensor) -> Tensor:
    """DINOv2's class token through torch's own pre-norm TransformerEncoderLayer (LayerScale folded into the output
    projections), patches by unfold + matmul; ``pos`` the position embedding for this grid (class token first)."""
    dim = st["cls_token"].shape[-1]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = ((images + 1) / 2 - mean) / std
    cols = torch.nn.functional.unfold(x, 14, stride=14).transpose(1, 2)  # (B, patches, 3*14*14)
    patches = cols @ st["patch_embed.proj.weight"].reshape(dim, -1).T + st["patch_embed.proj.bias"]
    tokens = torch.cat([st["cls_token"].expand(len(x), -1, -1), patches], dim=1) + pos
    if "register_tokens" in st:
        regs = st["register_tokens"].expand(len(x), -1, -1)
        tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in st if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        layer = nn.TransformerEncoderLayer(
            dim,
            dim // 64,
            4 * dim,
            dropout=0.0,
            activation="gelu",
            layer_norm_eps=1e-6,
            batch_first=True,
            norm_first=True,
        ).eval()
        with torch.no_grad():
            layer.self_attn.in_proj_weight.copy_(st[p + "attn.qkv.weight"])
            layer.self_attn.in_proj_bias.copy_(st[p + "attn.qkv.bias"])
            layer.self_attn.out_proj.weight.copy_(st[p + "ls1.gamma"][:, None] * st[p + "attn.proj.weight"])
            layer.self_attn.out_proj.bias.copy_(st[p + "ls1.gamma"] * st[p + "attn.proj.bias"])
            layer.linear1.weight.copy_(st[p + "mlp.fc1.weight"])
            layer.linear1.bias.copy_(st[p + "mlp.fc1.bias"])
            layer.linear2.weight.copy_(st[p + "ls2.gamma"][:, None] * st[p + "mlp.fc2.weight"])
            layer.linear2.bias.copy_(st[p + "ls2.gamma"] * st[p + "mlp.fc2.bias"])
            for n in ("norm1", "norm2"):
                getattr(layer, n).weight.copy_(st[p + n + ".weight"])
                getattr(layer, n).bias.copy_(st[p + n + ".bias"])
            tokens = layer(tokens)
    cls = tokens[:, 0]
    return torch.nn.functional.layer_norm(cls, (dim,), st["norm.weight"], st["norm.bias"], eps=1e-6)


def test_dinov2_distance_matches_torch_transformer_reference(tmp_path) -> None:
    from manifold_fm.tokenizers.perceptual import DINOv2Distance

    st = _dinov2_state()
    torch.save(st, tmp_path / "dinov2_tiny.pth")
    dist = DINOv2Distance(tmp_path / "dinov2_tiny.pth", image_size=28)  # the stored 2x2 grid: no interpolation
    a, b = torch.rand(3, 3, 28, 28) * 2 - 1, torch.rand(3, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        fa, fb = _dinov2_reference(st, a, st["pos_embed"]), _dinov2_reference(st, b, st["pos_embed"])
        torch.testing.assert_close(dist.features(a), fa, rtol=1e-4, atol=1e-5)
        want = 1 - torch.nn.functional.cosine_similarity(fa, fb, dim=1)
        torch.testing.assert_close(dist(a, b), want, rtol=1e-4, atol=1e-5)
        assert float(dist(a, a).abs().max()) < 1e-6
    # A grid other than the stored one interpolates the position embedding; a constant one must stay constant.
    const = dict(st)
    const["pos_embed"] = torch.cat([st["pos_embed"][:, :1], st["pos_embed"][:, 1:2].expand(1, 4, -1)], dim=1)
    d42 = DINOv2Distance(const, image_size=42)
    x = torch.rand(2, 3, 42, 42) * 2 - 1
    pos = torch.cat([const["pos_embed"][:, :1], const["pos_embed"][:, 1:2].expand(1, 9, -1)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(d42.features(x), _dinov2_reference(const, x, pos), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        DINOv2Distance(st, image_size=30)
    with pytest.raises(ValueError, match="dinov2"):
        DINOv2Distance({"cls_token": st["cls_token"]})


def test_swap_probe_extra_distance_equals_direct_computation() -> None:
    from manifold_fm.tokenizers.perceptual import DINOv2Distance

    dist = DINOv2Distance(_dinov2_state(dim=64, depth=1, registers=0), image_size=28)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    images = torch.cat([x, x])
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    tok = _PixelTokenizer()
    rep = component_swap_probe(tok, images, labels, max_pairs=3, extra_distances={"dinov2": dist})
    assert rep["anchors"] == 3 and rep["metrics"]["dinov2"] == dist.name
    for h in ("neighbour", "radius_swapped", "direction_swapped"):
        assert rep[h]["dinov2_mean"] == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        z = tok.encode(images[:3])
        flat = swap_hybrids(z, z)["radius_flattened"]
        want = dist(tok.decode(flat), tok.decode(z))
    assert rep["radius_flattened"]["dinov2"] == pytest.approx(want.tolist(), abs=1e-6)
    assert rep["radius_flattened"]["dinov2_mean"] == pytest.approx(float(want.double().mean()), abs=1e-6)
    with pytest.raises(ValueError, match="taken"):
        component_swap_probe(tok, images, labels, extra_distances={"psnr": dist})


def test_probe_cli_with_dinov2_weights(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from manifold_fm.cli import main

    torch.save(_dinov2_state(dim=64, depth=1, registers=0), tmp_path / "dinov2.pth")
    args = ["probe", "--per-class", "2", "--num", "24", "--t-points", "3", "--anchors", "6", "--out", str(tmp_path)]
    r = CliRunner().invoke(main, [*args, "--dinov2-weights", str(tmp_path / "dinov2.pth"), "--dinov2-size", "28"])
    assert r.exit_code == 0, r.output
    sw = json.loads((tmp_path / "report.json").read_text())["swap"]
    assert sw["metrics"]["dinov2"].startswith("dinov2-vit64") and len(sw["direction_swapped"]["dinov2"]) == 6
    assert all(0 <= v <= 2 for h in ("neighbour", "radius_swapped") for v in sw[h]["dinov2"])
    r = CliRunner().invoke(main, [*args, "--dinov2-weights", str(tmp_path / "dinov2.pth"), "--dinov2-size", "30"])
    assert r.exit_code == 1 and "multiple of the patch size 14" in r.output and "Traceback" not in r.output
