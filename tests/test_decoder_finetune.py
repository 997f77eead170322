"""Decoder finetuning on projected latents: it helps, leaves the tokenizer untouched, follows LDM's recipe (its
PatchGAN, hinge loss, adaptive weight, discriminator trained alongside), trains through the one trainer exactly as a
plain loop would (the default run's pinned recipe), and autocasts its forward passes in bf16."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from manifold_fm.data.builtin_images import BuiltinImages
from manifold_fm.data.guarded import load_image_batch
from manifold_fm.data.sources import StepIndexer
from manifold_fm.manifolds import TokenSpheres
from manifold_fm.tokenizers import SphericalTokenizer, TinyVAE, TinyVAETokenizer, builtin_tokenizer
from manifold_fm.tokenizers.discriminator import NLayerDiscriminator, load_nlayer_discriminator
from manifold_fm.tokenizers.finetune import (
    PatchDiscriminator,
    build_discriminator,
    compare_decoders,
    spread_indices,
    steps_for_epochs,
)
from manifold_fm.tokenizers.perceptual import GradientPyramidDistance, psnr
from manifold_fm.training.decoder_finetune import finetune_decoder
from manifold_fm.training.metrics_log import read_jsonl

from helpers import record_host_reads


def _finetune(tok, ds, steps: int, batch: int, *sets: str, **kwargs):
    """``finetune_decoder`` for ``steps`` at ``batch`` with ``key=value`` overrides, every step logged (so
    ``final_losses`` are the last step's), no progress bar and no held-out report unless asked."""
    kwargs.setdefault("eval_items", 0)
    over = [f"train.steps={steps}", f"train.batch_size={batch}", "train.log_every=1", *sets]
    return finetune_decoder(tok, ds, None, over, progress=False, device="cpu", **kwargs)


def _tiny_tokenizer() -> TinyVAETokenizer:
    torch.manual_seed(0)
    return TinyVAETokenizer(TinyVAE(4, (8, 8)).eval().requires_grad_(False))


def test_finetuned_decoder_beats_original_on_projected_latents() -> None:
    tok = builtin_tokenizer()
    before = {k: v.clone() for k, v in tok.vae.state_dict().items()}
    train, test = BuiltinImages("train", per_class=8), BuiltinImages("test", per_class=2)
    res = _finetune(tok, train, 16, 8, "optim.lr=3e-4", eval_dataset=test, eval_items=24)
    state, rep = res.decoder_state, res.report
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


def test_vanilla_control_gan_warmup_and_determinism(tmp_path) -> None:
    tok = _tiny_tokenizer()
    ds = BuiltinImages("train", per_class=1)
    r1 = _finetune(tok, ds, 4, 4, "finetune.gan_start=2", "finetune.gan_warmup=2", "finetune.latents=raw", eval_items=8)
    assert set(r1.report["metrics"]) == {
        f"{d}_decoder/{z}" for d in ("original", "finetuned") for z in ("raw_latents", "projected_latents")
    }
    losses = r1.report["final_losses"]
    assert losses["ramp"] == 1.0 and losses["disc"] > 0 and r1.report["project"] is False
    assert 0 < losses["gan_scale"] != 1.0  # the adaptive (gradient-ratio) GAN weight is in use
    fixed = _finetune(tok, ds, 3, 4, "finetune.gan_start=1", "finetune.adaptive_gan_weight=false")
    assert fixed.report["final_losses"]["gan_scale"] == 1.0
    r2 = _finetune(tok, ds, 4, 4, "finetune.gan_start=2", "finetune.gan_warmup=2", "finetune.latents=raw")
    assert all(torch.equal(r1.decoder_state[k], r2.decoder_state[k]) for k in r1.decoder_state)  # same seed
    # Along a linear warm-up of 4 steps from step 1 (0-based): ramp 0, 1/4, 2/4, 3/4, 1; the discriminator and the
    # adversarial term are off before it.
    _finetune(tok, ds, 5, 2, "finetune.gan_start=1", "finetune.gan_warmup=4", out_dir=tmp_path / "ramp")
    log = read_jsonl(tmp_path / "ramp" / "metrics.jsonl")
    assert [r["ramp"] for r in log] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert log[0]["disc"] == log[0]["adv"] == 0.0 and log[0]["gan_scale"] == 1.0 and log[1]["disc"] > 0
    from manifold_fm.config import ConfigError

    with pytest.raises(ConfigError, match="train.steps"):
        _finetune(tok, ds, -1, 2)


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
    res = _finetune(tok, ds, 1, 6, f"finetune.disc_init={tmp_path / 'd.pt'}", "train.seed=4")
    assert res.report["gan_start"] == 0  # a pretrained discriminator plays from the first step
    # Recompute step 0 independently: its images are the first batch of epoch 0's permutation.
    x = load_image_batch(ds, StepIndexer(len(ds), 6, seed=4).indices(0).tolist()).float()
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
    still = _finetune(tok, ds, 2, 4, f"finetune.disc_init={tmp_path / 'd.pt'}", "finetune.gan_weight=0")
    assert all(torch.equal(still.discriminator_state[k], v) for k, v in d0.state_dict().items())


def test_epochs_set_the_length_and_small_images_are_refused() -> None:
    tok = _tiny_tokenizer()
    ds = BuiltinImages("train", per_class=1)  # 12 images
    steps = steps_for_epochs(2, len(ds), 5)
    rep = _finetune(tok, ds, steps, 5, "finetune.gan_weight=0").report
    assert rep["steps"] == math.ceil(2 * 12 / 5) == 5 and rep["epochs"] == pytest.approx(25 / 12)
    with pytest.raises(ValueError, match="positive"):
        steps_for_epochs(0.0, 12, 5)
    small = BuiltinImages("train", per_class=1, size=16)
    with pytest.raises(ValueError, match=">= 24 px"):
        _finetune(tok, small, 2, 2, "finetune.gan_start=0")
    ok = _finetune(tok, small, 1, 2, "finetune.gan_start=0", "finetune.disc_layers=1").report
    assert ok["discriminator"]["layers"] == 1


def _plain_finetune(tokenizer, dataset, steps: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """The default run's recipe as one plain loop, written out independently of the trainer: small PatchGAN from
    steps // 2, linear warm-up over steps // 10, GAN weight 0.1, adaptive weight, decoder gradients clipped at 1,
    unscaled hinge loss; fallback perceptual distance; projected latents; step k's images the k-th batch of the
    per-epoch permutation seeded by ``seed``."""
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
    order = StepIndexer(len(dataset), batch_size, seed)
    for step in range(steps):
        x = torch.stack([dataset[i][0] for i in order.indices(step).tolist()]).float()
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
            a = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()
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


def test_default_run_decoder_finetune_equals_a_plain_loop(tmp_path, monkeypatch) -> None:
    """The built-in default run's decoder finetune, on the one trainer with its recipe pinned, equals the same
    recipe written as one plain loop (20 steps: GAN from step 10, a 2-step warm-up), bit for bit."""
    import manifold_fm.training.decoder_finetune as ft
    from manifold_fm.training.default_run import run_default

    real = ft.finetune_decoder
    seen: dict = {}

    def capture(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        seen["result"] = real(*args, **kwargs)
        raise _Stop

    monkeypatch.setattr(ft, "finetune_decoder", capture)
    overrides = [
        "data.per_class=2",
        "data.test_per_class=2",
        "finetune.steps=20",
        "finetune.batch_size=4",
        f"tokenizer.cache_dir={tmp_path / 'cache'}",
    ]
    with pytest.raises(_Stop):
        run_default(None, overrides, tmp_path / "run", progress=False, echo=lambda *a: None)
    tok, data, cfg = seen["args"]
    assert isinstance(data, TensorDataset) and cfg.train.steps == 20 and cfg.train.batch_size == 4
    assert cfg.finetune.discriminator == "patch" and cfg.optim.grad_clip == 1.0
    ref = _plain_finetune(tok, data, 20, 4, cfg.train.seed)
    state = seen["result"].decoder_state
    assert set(ref) == set(state)
    for k, v in ref.items():
        assert torch.equal(state[k], v), k
    assert seen["result"].out_dir == tmp_path / "run" / "decoder_finetune"


def test_compare_decoders_matches_direct_decoding() -> None:
    """Each cell of the side-by-side report is the decoder applied to those latents, scored directly."""
    tok = _tiny_tokenizer()
    ds = BuiltinImages("train", per_class=1)
    s_proj = _finetune(tok, ds, 2, 4, "finetune.gan_weight=0").decoder_state
    s_raw = _finetune(tok, ds, 2, 4, "finetune.gan_weight=0", "finetune.latents=raw").decoder_state
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


def test_a_bf16_finetune_step_autocasts_the_decoder_and_discriminator() -> None:
    """train.mixed_precision bf16: the decoder's and discriminator's convolutions run in bfloat16 (the frozen encoder
    in float32, outside autocast), the losses stay finite, the weights and the exported decoder stay float32, and the
    result differs from the float32 finetune's (the precision took effect)."""
    tok = _tiny_tokenizer()
    ds = BuiltinImages("train", per_class=1)
    encoder = {id(m) for m in tok.vae.encoder.modules()}
    seen: dict[str, set] = {"encoder": set(), "trained": set()}

    def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            seen["encoder" if id(module) in encoder else "trained"].add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        bf16 = _finetune(tok, ds, 2, 4, "finetune.gan_start=0", "train.mixed_precision=bf16")
    finally:
        handle.remove()
    assert seen == {"encoder": {torch.float32}, "trained": {torch.bfloat16}}
    assert bf16.report["mixed_precision"] == "bf16"
    assert all(math.isfinite(v) for v in bf16.report["final_losses"].values())
    assert bf16.report["final_losses"]["disc"] > 0 and bf16.report["final_losses"]["adv"] != 0
    weights = [*bf16.decoder_state.values(), *bf16.discriminator_state.values()]
    assert all(v.dtype == torch.float32 for v in weights if v.is_floating_point())
    fp32 = _finetune(tok, ds, 2, 4, "finetune.gan_start=0")
    assert any(not torch.equal(bf16.decoder_state[k], v) for k, v in fp32.decoder_state.items())


def test_a_finetune_step_never_reads_a_tensor_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a finetune step (GAN on, adaptive weight), code of the trainer, the objective and the finetune's losses
    turns no tensor into a Python number: the losses are read every train.log_every steps, as for flows."""
    watched = {"trainer.py", "objective.py", "decoder_finetune.py", "finetune.py", "perceptual.py", "spherical.py"}
    reads = record_host_reads(monkeypatch, watched)
    res = _finetune(_tiny_tokenizer(), BuiltinImages("train", per_class=1), 3, 4, "finetune.gan_start=1")
    assert reads == []
    assert res.report["final_losses"]["disc"] > 0 and res.report["final_losses"]["gan_scale"] != 1.0
