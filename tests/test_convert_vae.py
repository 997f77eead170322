"""LDM-layout autoencoder checkpoints -> diffusers AutoencoderKL folders (``manifold-fm convert-vae``).

The source model is a small LDM autoencoder written here from LDM's description (``ldm.modules.diffusionmodules.model``
Encoder / Decoder: ResnetBlock, single-head AttnBlock, asymmetric-pad stride-2 Downsample, nearest Upsample; module
names as LDM's, so its state dict *is* the LDM layout). Converted folders must reproduce its encoder mean and its
decoder output.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from manifold_fm.cli import main


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class _Resnet(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _Attn(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)  # (b, hw, c)
        k = self.k(h).reshape(b, c, hh * ww)  # (b, c, hw)
        w = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # (b, hw_q, hw_k)
        v = self.v(h).reshape(b, c, hh * ww)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class _Down(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Up(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int, attn: bool) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.block_2 = _Resnet(c, c), _Resnet(c, c)
    if attn:
        mid.attn_1 = _Attn(c)
    return mid


def _run_mid(mid: nn.Module, h):
    h = mid.block_1(h)
    if hasattr(mid, "attn_1"):
        h = mid.attn_1(h)
    return mid.block_2(h)


class _Encoder(nn.Module):
    def __init__(self, ch, ch_mult, nres, z, attn_levels, mid_attn) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(ch_mult):
            lvl = nn.Module()
            lvl.block = nn.ModuleList(_Resnet(cin if j == 0 else ch * m, ch * m) for j in range(nres))
            lvl.attn = nn.ModuleList(_Attn(ch * m) for _ in range(nres if i in attn_levels else 0))
            if i != len(ch_mult) - 1:
                lvl.downsample = _Down(ch * m)
            self.down.append(lvl)
            cin = ch * m
        self.mid = _mid(cin, mid_attn)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 2 * z, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            for j, block in enumerate(lvl.block):
                h = block(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        return self.conv_out(F.silu(self.norm_out(_run_mid(self.mid, h))))


class _Decoder(nn.Module):
    def __init__(self, ch, ch_mult, nres, z, attn_levels, mid_attn) -> None:
        super().__init__()
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z, cin, 3, 1, 1)
        self.mid = _mid(cin, mid_attn)
        ups = []
        for i in reversed(range(len(ch_mult))):
            cout = ch * ch_mult[i]
            lvl = nn.Module()
            lvl.block = nn.ModuleList(_Resnet(cin if j == 0 else cout, cout) for j in range(nres + 1))
            lvl.attn = nn.ModuleList(_Attn(cout) for _ in range(nres + 1 if i in attn_levels else 0))
            if i != 0:
                lvl.upsample = _Up(cout)
            ups.insert(0, lvl)  # up[i] is resolution level i, as in LDM
            cin = cout
        self.up = nn.ModuleList(ups)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, 1, 1)

    def forward(self, z):
        h = _run_mid(self.mid, self.conv_in(z))
        for i in reversed(range(len(self.up))):
            lvl = self.up[i]
            for j, block in enumerate(lvl.block):
                h = block(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _LDMAutoencoderKL(nn.Module):
    def __init__(self, ch=32, ch_mult=(1, 2, 2), nres=1, z=4, attn_levels=(2,), mid_attn=True) -> None:
        super().__init__()
        self.encoder = _Encoder(ch, ch_mult, nres, z, attn_levels, mid_attn)
        self.decoder = _Decoder(ch, ch_mult, nres, z, attn_levels, mid_attn)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(2 * z, 2 * z, 1), nn.Conv2d(z, z, 1)
        self.z = z
        with torch.no_grad():  # non-trivial GroupNorm affines, so a swapped norm would show
            for m in self.modules():
                if isinstance(m, nn.GroupNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)

    def mean(self, x):
        return self.quant_conv(self.encoder(x))[:, : self.z]

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


@pytest.mark.parametrize(
    ("kwargs", "prefix"),
    [
        ({}, ""),  # VA-VAE-like: attention at the lowest-resolution level of encoder and decoder, and in the mid
        ({"attn_levels": (), "ch_mult": (1, 2), "nres": 2}, "first_stage_model."),  # SD-VAE-like, SD key prefix
    ],
)
def test_convert_vae_reproduces_the_ldm_model(tmp_path, kwargs, prefix) -> None:
    from manifold_fm.tokenizers import DiffusersTokenizer

    torch.manual_seed(0)
    src = _LDMAutoencoderKL(**kwargs).eval()
    state = {prefix + k: v for k, v in src.state_dict().items()}
    extra = {"loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4), "loss.logvar": torch.zeros(())}
    torch.save({"state_dict": {**state, **extra}, "global_step": 10}, tmp_path / "vae.ckpt")
    out = tmp_path / "vae-diffusers"
    r = CliRunner().invoke(main, ["convert-vae", str(tmp_path / "vae.ckpt"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "left out (not part of the autoencoder): loss" in r.output
    cfg = json.loads((out / "config.json").read_text())
    n = len(kwargs.get("ch_mult", (1, 2, 2)))
    if not kwargs:
        assert cfg["down_block_types"][-1] == "AttnDownEncoderBlock2D" and cfg["up_block_types"][0].startswith("Attn")
    assert cfg["latent_channels"] == 4 and len(cfg["block_out_channels"]) == n and cfg["scaling_factor"] == 1.0

    tok = DiffusersTokenizer.from_pretrained(out)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z_ref = src.mean(x)
        z = tok.encode_raw(x)
        torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tok.vae.decode(z_ref).sample, src.decode(z_ref), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tok.decode_raw(z_ref), src.decode(z_ref).clamp(-1, 1), rtol=1e-4, atol=1e-5)
    assert tok.downsample == 2 ** (n - 1) and z.shape == (2, 4, 16 // 2 ** (n - 1), 16 // 2 ** (n - 1))


def test_convert_vae_normalisation_and_errors(tmp_path) -> None:
    from manifold_fm.tokenizers import DiffusersTokenizer

    torch.manual_seed(1)
    src = _LDMAutoencoderKL(ch_mult=(1, 2), attn_levels=())
    torch.save(src.state_dict(), tmp_path / "vae.pt")
    mean, std = torch.arange(4.0).view(1, 4, 1, 1), torch.tensor([1.0, 2.0, 0.5, 4.0]).view(1, 4, 1, 1)
    torch.save({"mean": mean, "std": std}, tmp_path / "latents_stats.pt")
    out = tmp_path / "conv"
    r = CliRunner().invoke(
        main,
        [
            "convert-vae",
            str(tmp_path / "vae.pt"),
            "--out",
            str(out),
            "--latents-stats",
            str(tmp_path / "latents_stats.pt"),
        ],
    )
    assert r.exit_code == 0, r.output
    tok = DiffusersTokenizer.from_pretrained(out)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        z = src.mean(x)
        torch.testing.assert_close(tok.encode(x), (z - mean) / std, rtol=1e-4, atol=1e-5)  # LightningDiT's scaling
    # One-line errors: an existing folder is never overwritten; a checkpoint without an autoencoder; a missing file.
    r = CliRunner().invoke(main, ["convert-vae", str(tmp_path / "vae.pt"), "--out", str(out)])
    assert r.exit_code == 1 and "already exists" in r.output and (out / "config.json").is_file()
    torch.save({"loss.discriminator.main.0.weight": torch.zeros(1)}, tmp_path / "disc.pt")
    r = CliRunner().invoke(main, ["convert-vae", str(tmp_path / "disc.pt"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "not an LDM-layout autoencoder" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["convert-vae", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "y")])
    assert r.exit_code == 1 and "nope.ckpt does not exist" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
