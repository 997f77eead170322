"""Tokenizer interface, latent normalisation, the built-in tiny VAE, the spherical tokenizer and image metrics."""

from __future__ import annotations

import math

import pytest
import torch

import manifold_fm.tokenizers.tiny_vae as tv
from manifold_fm.data.builtin_images import BuiltinImages
from manifold_fm.tokenizers import (
    LatentNormalization,
    SphericalTokenizer,
    TinyVAE,
    TinyVAETokenizer,
    builtin_tokenizer,
    compute_channel_stats,
    load_tokenizer,
)
from manifold_fm.tokenizers.perceptual import GradientPyramidDistance, psnr, ssim


@pytest.fixture(scope="module")
def builtin() -> TinyVAETokenizer:
    return builtin_tokenizer()


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    return BuiltinImages("test", per_class=4).tensors()[0]


# ------------------------------------------------------------------ normalisation
def _flux2_patchify(z: torch.Tensor) -> torch.Tensor:
    """diffusers' Flux2Pipeline._patchify_latents, copied as the independent reference."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * 4, h // 2, w // 2)


@pytest.mark.parametrize("kind", ["scalar", "channel", "pattern"])
def test_normalization_roundtrip_and_json(kind: str, tmp_path) -> None:
    c = 4
    shift = {"scalar": 0.3, "channel": torch.randn(c), "pattern": torch.randn(c, 2, 2)}[kind]
    scale = {"scalar": 2.0, "channel": torch.rand(c) + 0.5, "pattern": torch.rand(c, 2, 2) + 0.5}[kind]
    norm = LatentNormalization(shift, scale, kind="constants")
    z = torch.randn(3, c, 6, 8, dtype=torch.float64)
    torch.testing.assert_close(norm.denormalize(norm.normalize(z)), z)
    norm.save(tmp_path / "stats.json")
    back = LatentNormalization.load(tmp_path / "stats.json")
    torch.testing.assert_close(back.normalize(z), norm.normalize(z))


def test_periodic_pattern_equals_flux2_pipeline_normalisation() -> None:
    c = 3
    mean, std = torch.randn(4 * c, dtype=torch.float64), torch.rand(4 * c, dtype=torch.float64) + 0.5
    z = torch.randn(2, c, 6, 4, dtype=torch.float64)
    ref = (_flux2_patchify(z) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    norm = LatentNormalization(mean.view(c, 2, 2), 1 / std.view(c, 2, 2), kind="batchnorm")
    torch.testing.assert_close(_flux2_patchify(norm.normalize(z)), ref)


def test_normalization_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="scalar"):
        LatentNormalization(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="zero"):
        LatentNormalization(0.0, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="channels"):
        LatentNormalization(torch.zeros(5)).normalize(torch.zeros(1, 4, 2, 2))
    with pytest.raises(FileNotFoundError):
        LatentNormalization.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="JSON"):
        LatentNormalization.load(tmp_path / "bad.json")


def test_compute_channel_stats_matches_direct(builtin) -> None:
    ds = BuiltinImages("test", per_class=2)
    stats = compute_channel_stats(builtin, ds, batch_size=7)
    with torch.no_grad():
        z = builtin.encode_raw(ds.tensors()[0]).double()
    per_channel = z.transpose(0, 1).reshape(z.shape[1], -1)
    torch.testing.assert_close(stats.shift, per_channel.mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(1 / stats.scale, per_channel.std(1, unbiased=False), rtol=1e-4, atol=1e-5)
    normed = stats.normalize(z)
    assert float(normed.mean(dim=(0, 2, 3)).abs().max()) < 1e-4


# ------------------------------------------------------------------ tiny VAE
def test_tiny_vae_architecture() -> None:
    vae = TinyVAE()
    n = sum(p.numel() for p in vae.parameters())
    assert 1e5 < n < 1e6 and vae.downsample == 4 and vae.latent_channels >= 16
    out = vae(torch.zeros(2, 3, 32, 32))
    assert out["recon"].shape == (2, 3, 32, 32) and out["mean"].shape == (2, 16, 8, 8)


def test_builtin_tokenizer_contract_and_quality(builtin, test_images) -> None:
    tok = builtin
    assert tok.latent_channels == 16 and tok.downsample == 4 and tok.channel_axis == 1
    assert tok.name.startswith("builtin-tiny-vae-") and tok.normalization.kind == "dataset"
    with torch.no_grad():
        z = tok.encode(test_images)
        assert z.shape == (len(test_images), 16, 8, 8)
        assert torch.equal(z, tok.encode(test_images))  # deterministic posterior mode
        raw = tok.encode_raw(test_images)
        torch.testing.assert_close(z, tok.normalization.normalize(raw))
        rec = tok.decode(z)
    assert rec.min() >= -1 and rec.max() <= 1
    assert float(psnr(rec, test_images).mean()) > 25.0  # the shipped weights reach ~28 dB
    again = builtin_tokenizer()
    assert again.name == tok.name
    assert all(
        torch.equal(a, b) for a, b in zip(again.vae.state_dict().values(), tok.vae.state_dict().values(), strict=True)
    )


def test_encode_rejects_bad_images(builtin) -> None:
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        builtin.encode(torch.full((1, 3, 32, 32), 255.0))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        builtin.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        builtin.encode(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match="NaN"):
        builtin.encode(torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        builtin.decode(torch.zeros(1, 4, 8, 8))


def test_builtin_tokenizer_trains_and_caches_when_no_asset(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tv, "ASSET_PATH", tmp_path / "absent.safetensors")
    monkeypatch.setenv("MANIFOLD_FM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="train_if_missing"):
        tv.builtin_tokenizer(train_if_missing=False)
    real = tv.train_tiny_vae
    monkeypatch.setattr(
        tv,
        "train_tiny_vae",
        lambda **kw: real(steps=2, per_class=1, eval_per_class=1, progress=False, latent_channels=4, channels=(8, 8)),
    )
    tok = tv.builtin_tokenizer(progress=False)
    assert (tmp_path / "cache" / tv.CACHE_NAME).is_file() and tok.latent_channels == 4

    def fail(**kw):  # the second call must load the cache, not retrain
        raise AssertionError("retrained")

    monkeypatch.setattr(tv, "train_tiny_vae", fail)
    again = tv.builtin_tokenizer()
    assert again.name == tok.name
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(again.encode(x), tok.encode(x))
    (tmp_path / "cache" / tv.CACHE_NAME).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        tv.builtin_tokenizer()


# ------------------------------------------------------------------ spherical
def test_spherical_tokenizer(builtin, test_images) -> None:
    sph = SphericalTokenizer(builtin)
    d = builtin.latent_channels
    with torch.no_grad():
        z = sph.encode(test_images[:8])
        raw = builtin.encode_raw(test_images[:8]).double()
        ref = math.sqrt(d) * raw / raw.norm(dim=1, keepdim=True)
        torch.testing.assert_close(z.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z.norm(dim=1), torch.full((8, 8, 8), math.sqrt(d)), rtol=1e-5, atol=1e-5)
        sph.manifold.check_point(z)
        # Without a finetuned state the decoder is the base decoder (on projected latents).
        torch.testing.assert_close(sph.decode(z), builtin.decode_raw(z))
    assert sph.normalization.is_identity and sph.manifold.dim == d and not sph.finetuned
    # A state dict is loaded into a copy; the base decoder is untouched.
    state = {k: v + 0.01 for k, v in builtin.decoder_module().state_dict().items()}
    ft = SphericalTokenizer(builtin, state)
    assert ft.finetuned and ft.name.endswith("+ft")
    w0 = next(iter(builtin.decoder_module().state_dict().values()))
    w1 = next(iter(ft.decoder.state_dict().values()))
    torch.testing.assert_close(w1, w0 + 0.01)
    with pytest.raises(ValueError, match="does not fit"):
        SphericalTokenizer(builtin, {"nope": torch.zeros(1)})
    spec = load_tokenizer("builtin", spherical=True)
    assert isinstance(spec, SphericalTokenizer)


# ------------------------------------------------------------------ metrics
def test_psnr_known_answer() -> None:
    a = torch.zeros(2, 3, 8, 8)
    b = a + 0.1  # 0.05 on the [0, 1] scale: mse 0.0025 -> 26.0206 dB
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 10 * math.log10(1 / 0.0025)))
    assert float(psnr(a, a)[0]) == pytest.approx(100.0)


def _ssim_loop(x: torch.Tensor, y: torch.Tensor) -> float:
    """Plain-loop SSIM reference (float64, 11x11 Gaussian window sigma 1.5, valid positions)."""
    x, y = (x.double() + 1) / 2, (y.double() + 1) / 2
    k = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(k**2) / (2 * 1.5**2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    vals = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - 10):
            for j in range(x.shape[2] - 10):
                p, q = x[c, i : i + 11, j : j + 11], y[c, i : i + 11, j : j + 11]
                mp, mq = (w * p).sum(), (w * q).sum()
                vp = (w * p * p).sum() - mp**2
                vq = (w * q * q).sum() - mq**2
                cov = (w * p * q).sum() - mp * mq
                c1, c2 = 0.01**2, 0.03**2
                vals.append(((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
    return float(torch.stack(vals).mean())


def test_ssim_matches_plain_loop() -> None:
    a = torch.rand(2, 3, 13, 14) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    s = ssim(a, b)
    for i in range(2):
        assert float(s[i]) == pytest.approx(_ssim_loop(a[i], b[i]), abs=1e-6)
    torch.testing.assert_close(ssim(a, a), torch.ones(2))


def test_fallback_distance_properties() -> None:
    dist = GradientPyramidDistance()
    a = torch.rand(3, 3, 16, 16, requires_grad=True)
    b = torch.rand(3, 3, 16, 16)
    d = dist(a, b)
    assert d.shape == (3,) and bool((d > 0).all())
    torch.testing.assert_close(dist(b, a.detach()), d.detach())
    torch.testing.assert_close(dist(b, b), torch.zeros(3))
    d.sum().backward()
    assert torch.isfinite(a.grad).all()
    # Level 0 by hand: mean|d| + mean|dx d| + mean|dy d| for a single level.
    one = GradientPyramidDistance(levels=1)
    e = (a - b).detach()
    ref = e.abs().mean((1, 2, 3)) + e.diff(dim=-1).abs().mean((1, 2, 3)) + e.diff(dim=-2).abs().mean((1, 2, 3))
    torch.testing.assert_close(one(a.detach(), b), ref)


def test_lpips_from_local_weights_matches_reference(tmp_path) -> None:
    """LPIPS loads torchvision-format VGG16 weights and LPIPS-format heads (random here: nothing is downloaded) and
    agrees with a layer-by-layer float64 recomputation of the LPIPS formula."""
    from torchvision.models.vgg import cfgs, make_layers

    from manifold_fm.tokenizers.perceptual import LPIPS, perceptual_distance

    torch.manual_seed(0)
    with torch.device("meta"):
        feats = make_layers(cfgs["D"])
    state = {k: torch.randn(v.shape) * (2.0 / max(1, v[0].numel())) ** 0.5 for k, v in feats.state_dict().items()}
    feats.load_state_dict(state, assign=True)
    torch.save({f"features.{k}": v for k, v in state.items()}, tmp_path / "vgg16.pth")
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lins, tmp_path / "vgg.pth")
    metric = perceptual_distance(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    assert isinstance(metric, LPIPS) and metric.name == "lpips-vgg"
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    got = metric(a, b)
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    f64 = feats.double()
    ha, hb = (a.double() - shift) / scale, (b.double() - shift) / scale
    ref = torch.zeros(2, dtype=torch.float64)
    taps = {3: 0, 8: 1, 15: 2, 22: 3, 29: 4}
    for i, layer in enumerate(f64[:30]):
        ha, hb = layer(ha), layer(hb)
        if i in taps:
            na = ha / (ha.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = hb / (hb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            w = lins[f"lin{taps[i]}.model.1.weight"].double().view(1, -1, 1, 1)
            ref += ((na - nb) ** 2 * w).sum(1).mean(dim=(1, 2))
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(metric(a, a), torch.zeros(2))
    with pytest.raises(ValueError, match="both"):
        perceptual_distance(tmp_path / "vgg16.pth", None)
    torch.save({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="lin1"):
        perceptual_distance(tmp_path / "vgg16.pth", tmp_path / "short.pth")
    with pytest.raises(FileNotFoundError):
        perceptual_distance(tmp_path / "missing.pth", tmp_path / "vgg.pth")
