"""Decoder finetuning on projected latents: it helps, leaves the tokenizer untouched, follows LDM's recipe (its
PatchGAN, hinge loss, adaptive weight, discriminator trained alongside), and the default run's recipe is pinned."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from manifold_fm.data.builtin_images import BuiltinImages
from manifold_fm.data.guarded import load_image_batch
from manifold_fm.manifolds import TokenSpheres
from manifold_fm.tokenizers import SphericalTokenizer, TinyVAE, TinyVAETokenizer, builtin_tokenizer
from manifold_fm.tokenizers.discriminator import NLayerDiscriminator, load_nlayer_discriminator
from manifold_fm.tokenizers.finetune import (
    PatchDiscriminator,
    build_discriminator,
    compare_decoders,
    finetune_decoder,
    finetune_decoder_and_discriminator,
    spread_indices,
)
from manifold_fm.tokenizers.perceptual import GradientPyramidDistance, psnr


def _tiny_tokenizer() -> TinyVAETokenizer:
    torch.manual_seed(0)
    return TinyVAETokenizer(TinyVAE(4, (8, 8)).eval().requires_grad_(False))


def test_finetuned_decoder_beats_original_on_projected_latents() -> None:
    tok = builtin_tokenizer()
    before = {k: v.clone() for k, v in tok.vae.state_dict().items()}
    train, test = BuiltinImages("train", per_class=8), BuiltinImages("test", per_class=2)
    state, rep = finetune_decoder(
        tok, train, 16, batch_size=8, lr=3e-4, eval_dataset=test, eval_items=24, progress=False
    )
    m = rep["metrics"]
    raw, proj = m["original_decoder/raw_latents"], m["original_decoder/projected_latents"]
    ft = m["finetuned_decoder/projected_latents"]
    assert proj["psnr"] < raw["psnr"]  # projection alone costs reconstruction quality...
    assert ft["psnr"] > proj["psnr"] + 0.3  # ...and finetuning the decoder wins part of it back
    assert ft["perceptual"] < proj["perceptual"]
    assert rep["perceptual_metric"] == "fallback:grad-pyramid-l1" and rep["project"]
    assert rep["discriminator"]["class"].startswith("NLayerDiscriminator") and rep["gan_start"] == 8
    assert all(torch.equal(before[k], v) for k, v in tok.vae.state_dict().items())  # tokenizer untouched
    # The report's number is what the SphericalTokenizer built from the state reproduces.
    sph = SphericalTokenizer(tok, state)
    x = test.tensors()[0][:24]
    with torch.no_grad():
        rec = sph.decode(sph.encode(x))
    assert float(psnr(rec, x).mean()) == pytest.approx(ft["psnr"], abs=1e-3)


def test_vanilla_control_gan_warmup_and_determinism() -> None:
    tok = _tiny_tokenizer()
    ds = BuiltinImages("train", per_class=1)
    s1, r1 = finetune_decoder(
        tok, ds, 4, batch_size=4, gan_start=2, gan_warmup=2, project=False, eval_items=8, progress=False
    )
    assert set(r1["metrics"]) == {
        "original_decoder/raw_latents",
        "original_decoder/projected_latents",
        "finetuned_decoder/raw_latents",
    }
    assert r1["final_losses"]["ramp"] == 1.0 and r1["final_losses"]["disc"] > 0
    assert 0 < r1["final_losses"]["gan_scale"] != 1.0  # the adaptive (gradient-ratio) GAN weight is in use
    _, fixed = finetune_decoder(
        tok, ds, 3, batch_size=4, gan_start=1, adaptive_gan_weight=False, eval_items=4, progress=False
    )
    assert fixed["final_losses"]["gan_scale"] == 1.0
    s2, _ = finetune_decoder(
        tok, ds, 4, batch_size=4, gan_start=2, gan_warmup=2, project=False, eval_items=8, progress=False
    )
    assert all(torch.equal(s1[k], s2[k]) for k in s1)  # same seed, same result
    _, r3 = finetune_decoder(tok, ds, 2, batch_size=4, gan_start=5, eval_items=8, progress=False)
    assert r3["final_losses"]["ramp"] == 0.0 and r3["final_losses"]["disc"] == 0.0  # still warming up
    # Ramp values along a linear warm-up of 4 steps from step 1: 0, 1/4, 2/4, 3/4, 1.
    for steps, want in [(1, 0.0), (2, 0.25), (3, 0.5), (5, 1.0)]:
        _, r = finetune_decoder(tok, ds, steps, batch_size=2, gan_start=1, gan_warmup=4, eval_items=0, progress=False)
        assert r["final_losses"]["ramp"] == want
    with pytest.raises(ValueError, match="steps"):
        finetune_decoder(tok, ds, -1)


def _ldm_param_count(in_ch: int, base: int, layers: int, actnorm: bool) -> int:
    """Parameters of LDM's NLayerDiscriminator from its description: 4x4 convolutions with channel multipliers
    min(2^n, 8); the first and last convolution carry a bias, the others only with ActNorm; each norm layer has two
    per-channel parameters (BatchNorm weight/bias or ActNorm loc/scale)."""
    chans = [in_ch] + [base * min(2**n, 8) for n in range(layers + 1)] + [1]
    total = 0
    for i in range(len(chans) - 1):
        c_in, c_out = chans[i], chans[i + 1]
        first_or_last = i == 0 or i == len(chans) - 2
        total += c_in * c_out * 16 + (c_out if first_or_last or actnorm else 0)
        if not first_or_last:
            total += 2 * c_out
    return total


def test_nlayer_discriminator_matches_ldm_architecture() -> None:
    d = NLayerDiscriminator()  # the default: 3 layers, 64 channels, BatchNorm
    n = sum(p.numel() for p in d.parameters())
    assert n == _ldm_param_count(3, 64, 3, False) == 2_765_633
    shapes = {k: tuple(v.shape) for k, v in d.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert shapes == {
        "main.0.weight": (64, 3, 4, 4),
        "main.0.bias": (64,),
        "main.2.weight": (128, 64, 4, 4),
        **{f"main.3.{s}": (128,) for s in ("weight", "bias", "running_mean", "running_var")},
        "main.5.weight": (256, 128, 4, 4),
        **{f"main.6.{s}": (256,) for s in ("weight", "bias", "running_mean", "running_var")},
        "main.8.weight": (512, 256, 4, 4),
        **{f"main.9.{s}": (512,) for s in ("weight", "bias", "running_mean", "running_var")},
        "main.11.weight": (1, 512, 4, 4),
        "main.11.bias": (1,),
    }
    # LDM's initialisation: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02) and shift 0.
    assert float(d.main[8].weight.detach().std()) == pytest.approx(0.02, rel=0.01)
    assert float(d.main[9].weight.detach().mean()) == pytest.approx(1.0, abs=0.01) and not d.main[9].bias.any()
    assert sum(p.numel() for p in NLayerDiscriminator(3, 16, 2, "actnorm").parameters()) == _ldm_param_count(
        3, 16, 2, True
    )
    # The 70x70 PatchGAN: 256 px -> 30x30 logits; receptive field 70 px, jump 8, offset 1+2+4+8+8 = 23 px.
    with torch.no_grad():
        assert d.eval()(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    x = torch.randn(1, 3, 96, 96, requires_grad=True)
    d.eval()(x)[0, 0, 5, 5].backward()
    rows = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 3)) > 0).flatten()
    cols = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 2)) > 0).flatten()
    assert (int(rows.min()), int(rows.max())) == (5 * 8 - 23, 5 * 8 - 23 + 69)
    assert (int(cols.min()), int(cols.max())) == (5 * 8 - 23, 5 * 8 - 23 + 69)
    with pytest.raises(ValueError, match="at least 24 px"):
        d(torch.zeros(1, 3, 16, 16))


def test_patch_discriminator_shape() -> None:
    d = PatchDiscriminator(layers=2)
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 8, 8)


def test_discriminator_loads_an_ldm_layout_checkpoint(tmp_path) -> None:
    torch.manual_seed(7)
    src = NLayerDiscriminator(3, 16, 2)
    src.main[3].running_mean.uniform_()  # non-default buffers travel too
    ckpt = {
        "state_dict": {
            "encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
            "loss.logvar": torch.zeros(()),
            **{f"loss.discriminator.{k}": v for k, v in src.state_dict().items()},
        },
        "global_step": 5,
    }
    torch.save(ckpt, tmp_path / "ae.ckpt")
    loaded = load_nlayer_discriminator(tmp_path / "ae.ckpt")
    assert (loaded.layers, loaded.base_channels, loaded.norm) == (2, 16, "batch")
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    d = build_discriminator("nlayer", init=tmp_path / "ae.ckpt", layers=2)
    assert all(torch.equal(d.state_dict()[k], v) for k, v in src.state_dict().items())
    with pytest.raises(ValueError, match="layers 3 \\(checkpoint: 2\\)"):
        build_discriminator("nlayer", init=tmp_path / "ae.ckpt", layers=3)
    # ActNorm layout (convolutions with biases, loc/scale): the architecture is read from the keys.
    act = NLayerDiscriminator(3, 8, 1, "actnorm")
    torch.save({f"discriminator.{k}": v for k, v in act.state_dict().items()}, tmp_path / "act.pt")
    assert load_nlayer_discriminator(tmp_path / "act.pt").norm == "actnorm"
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "none.pt")
    with pytest.raises(ValueError, match="no 'main"):
        load_nlayer_discriminator(tmp_path / "none.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_nlayer_discriminator(tmp_path / "missing.pt")


def test_discriminator_trains_with_ldm_hinge_and_adaptive_weight(tmp_path) -> None:
    """One step from a saved discriminator, checked against a recomputation of LDM's losses: the hinge loss is
    0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) of the *initial* discriminator (train mode, batch
    statistics) and the adaptive weight |grad L_rec| / (|grad L_adv| + 1e-4) at the decoder's last convolution."""
    tok = _tiny_tokenizer()
    ds = BuiltinImages("train", per_class=1)
    torch.manual_seed(3)
    d0 = NLayerDiscriminator(3, 16, 2)
    torch.save({f"loss.discriminator.{k}": v for k, v in d0.state_dict().items()}, tmp_path / "d.pt")
    res = finetune_decoder_and_discriminator(
        tok, ds, 1, batch_size=6, disc_init=tmp_path / "d.pt", eval_items=0, progress=False, seed=4
    )
    assert res.report["gan_start"] == 0  # a pretrained discriminator plays from the first step
    # Recompute step 0 independently.
    idx = torch.randint(0, len(ds), (6,), generator=torch.Generator().manual_seed(4)).tolist()
    x = load_image_batch(ds, idx).float()
    dec = copy.deepcopy(tok.decoder_module()).float().train().requires_grad_(True)
    with torch.no_grad():
        z = TokenSpheres(4).projx(tok.encode_raw(x))
    rec = dec(z)
    rec_loss = (rec - x).abs().mean() + GradientPyramidDistance()(rec, x).mean()
    ref_disc = copy.deepcopy(d0).train()
    adv = -ref_disc(rec).mean()
    w = [p for p in dec.parameters() if p.ndim == 4][-1]
    g_rec = torch.autograd.grad(rec_loss, w, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, w)[0]
    a = float(g_rec.norm() / (g_adv.norm() + 1e-4))
    with torch.no_grad():
        ref_d = copy.deepcopy(d0).train()
        hinge = 0.5 * (torch.relu(1 - ref_d(x)).mean() + torch.relu(1 + ref_d(rec)).mean())
    fl = res.report["final_losses"]
    assert fl["gan_scale"] == pytest.approx(a, rel=1e-4)
    assert fl["disc"] == pytest.approx(float(hinge), rel=1e-5)
    # Both trained: every discriminator weight moved, BatchNorm statistics too.
    for k, v in d0.state_dict().items():
        if k.endswith("weight") or k.endswith("running_mean"):
            assert not torch.equal(res.discriminator_state[k], v), k
    # Without the adversarial term the discriminator stays as loaded.
    still = finetune_decoder_and_discriminator(
        tok, ds, 2, batch_size=4, disc_init=tmp_path / "d.pt", gan_weight=0.0, eval_items=0, progress=False
    )
    assert all(torch.equal(still.discriminator_state[k], v) for k, v in d0.state_dict().items())


def test_epochs_set_the_length_and_small_images_are_refused() -> None:
    tok = _tiny_tokenizer()
    ds = BuiltinImages("train", per_class=1)  # 12 images
    _, rep = finetune_decoder(tok, ds, epochs=2, batch_size=5, gan_weight=0.0, eval_items=0, progress=False)
    assert rep["steps"] == math.ceil(2 * 12 / 5) == 5 and rep["epochs"] == pytest.approx(25 / 12)
    with pytest.raises(ValueError, match="exactly one"):
        finetune_decoder(tok, ds, 3, epochs=1.0, progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        finetune_decoder(tok, ds, progress=False)
    small = BuiltinImages("train", per_class=1, size=16)
    with pytest.raises(ValueError, match=">= 24 px"):
        finetune_decoder(tok, small, 2, batch_size=2, gan_start=0, eval_items=0, progress=False)
    _, ok = finetune_decoder(tok, small, 1, batch_size=2, gan_start=0, disc_layers=1, eval_items=0, progress=False)
    assert ok["discriminator"]["layers"] == 1


def _legacy_finetune(tokenizer, dataset, steps: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """A frozen copy of the finetune loop the built-in default run used before LDM's discriminator became the
    default (small PatchGAN from steps // 2, linear warm-up over steps // 10, GAN weight 0.1, adaptive weight,
    decoder gradients clipped at 1, unscaled hinge loss; fallback perceptual distance; projected latents)."""
    manifold = TokenSpheres(tokenizer.latent_channels, axis=1)
    perceptual = GradientPyramidDistance()
    gan_start, gan_warmup = steps // 2, max(1, steps // 10)
    decoder = copy.deepcopy(tokenizer.decoder_module()).float().train().requires_grad_(True)
    last_conv = [q for q in decoder.parameters() if q.ndim == 4][-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        disc = PatchDiscriminator()
    opt_g = torch.optim.AdamW(decoder.parameters(), lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(dataset), (batch_size,), generator=g).tolist()
        x = load_image_batch(dataset, idx).float()
        with torch.no_grad():
            z = manifold.projx(tokenizer.encode_raw(x).float())
        rec = decoder(z)
        loss = (rec - x).abs().mean() + perceptual(rec, x).mean()
        ramp = 0.0 if step < gan_start else min(1.0, (step - gan_start + 1) / gan_warmup)
        if ramp > 0:
            disc.requires_grad_(False)
            adv = -disc(rec).mean()
            g_rec = torch.autograd.grad(loss, last_conv, retain_graph=True)[0]
            g_adv = torch.autograd.grad(adv, last_conv, retain_graph=True)[0]
            a = float((g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4))
            loss = loss + ramp * 0.1 * a * adv
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt_g.step()
        if step >= gan_start:
            disc.requires_grad_(True)
            d_loss = torch.relu(1 - disc(x)).mean() + torch.relu(1 + disc(rec.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
    return {k: v.detach().float() for k, v in decoder.state_dict().items()}


class _Stop(Exception):
    pass


def test_default_run_decoder_finetune_is_unchanged(tmp_path, monkeypatch) -> None:
    """The built-in default run calls finetune_decoder with its recipe pinned: the decoder it gets equals the old
    loop's, bit for bit (20 steps: GAN from step 10, a 2-step warm-up)."""
    import manifold_fm.tokenizers.finetune as ft
    from manifold_fm.training.default_run import run_default

    real = ft.finetune_decoder
    seen: dict = {}

    def capture(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        seen["state"], _ = real(*args, **kwargs)
        raise _Stop

    monkeypatch.setattr(ft, "finetune_decoder", capture)
    overrides = [
        "data.per_class=2",
        "data.test_per_class=2",
        "finetune.steps=20",
        "finetune.batch_size=4",
        "eval.classifier_steps=1",
        f"tokenizer.cache_dir={tmp_path / 'cache'}",
    ]
    with pytest.raises(_Stop):
        run_default(None, overrides, tmp_path / "run", progress=False, echo=lambda *a: None)
    tok, data, steps = seen["args"]
    assert isinstance(data, TensorDataset) and steps == 20 and seen["kwargs"]["batch_size"] == 4
    ref = _legacy_finetune(tok, data, 20, 4, seen["kwargs"]["seed"])
    assert set(ref) == set(seen["state"])
    for k, v in ref.items():
        assert torch.equal(seen["state"][k], v), k


def test_compare_decoders_matches_direct_decoding() -> None:
    """Each cell of the side-by-side report is the decoder applied to those latents, scored directly."""
    tok = _tiny_tokenizer()
    ds = BuiltinImages("train", per_class=1)
    s_proj, _ = finetune_decoder(tok, ds, 2, batch_size=4, gan_weight=0.0, eval_items=0, progress=False)
    s_raw, _ = finetune_decoder(tok, ds, 2, batch_size=4, gan_weight=0.0, project=False, eval_items=0, progress=False)
    test = BuiltinImages("test", per_class=1)
    idx = spread_indices(len(test), 7)
    assert len(idx) == 7 and idx[0] == 0 and idx[-1] == len(test) - 1
    out = compare_decoders(tok, {"original": None, "ft_vanilla": s_raw, "spherical": s_proj}, test, idx, batch_size=3)
    assert out["images"] == 7 and out["skipped"] == 0 and len(out["metrics"]) == 6
    x = load_image_batch(test, idx)
    with torch.no_grad():
        raw = tok.encode_raw(x)
        proj = raw * (2.0 / raw.norm(dim=1, keepdim=True))  # sqrt(d) = 2 for d = 4
        direct = {
            ("original", "raw_latents"): tok.decode_raw(raw),
            ("spherical", "projected_latents"): SphericalTokenizer(tok, s_proj).decode_raw(proj),
            ("ft_vanilla", "projected_latents"): SphericalTokenizer(tok, s_raw).decode_raw(proj),
        }
    for (dec, lat), rec in direct.items():
        cell = out["swap_control"][lat][dec]
        assert cell["psnr"] == pytest.approx(float(psnr(rec, x).double().mean()), abs=1e-4)
        assert cell["perceptual"] == pytest.approx(float(GradientPyramidDistance()(rec, x).mean()), abs=1e-5)
    assert out["reconstruction"]["spherical"] is out["metrics"]["spherical_decoder/projected_latents"]
    assert out["reconstruction"]["ft_vanilla"] is out["metrics"]["ft_vanilla_decoder/raw_latents"]
    assert list(out["swap_control"]["raw_latents"]) == ["original", "ft_vanilla", "spherical"]
