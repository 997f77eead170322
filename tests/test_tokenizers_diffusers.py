"""Diffusers adapters, tested with tiny randomly initialised VAEs saved to disk and loaded back like a user would."""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers adapters need the optional 'images' extra")

from manifold_fm.tokenizers import SphericalTokenizer, load_tokenizer  # noqa: E402
from manifold_fm.tokenizers.diffusers_adapter import DiffusersTokenizer  # noqa: E402

from helpers import require_flux2_vae  # noqa: E402

TINY = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=16,
    mid_block_add_attention=False,
)


@pytest.fixture(scope="module")
def kl_dir(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sdvae")
    vae = diffusers.AutoencoderKL(latent_channels=4, scaling_factor=0.5, shift_factor=0.1, **TINY)
    vae.save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
    cls = require_flux2_vae()
    torch.manual_seed(1)
    vae = cls(latent_channels=4, **TINY)
    # Non-trivial batch-norm statistics over the 4 * 4 patchified channels.
    vae.bn.running_mean.copy_(torch.randn(16))
    vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    root = tmp_path_factory.mktemp("flux2")
    vae.save_pretrained(root)
    return root


def _images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size) * 2 - 1


def test_autoencoder_kl_roundtrip_through_from_pretrained(kl_dir) -> None:
    tok = DiffusersTokenizer.from_pretrained(kl_dir, subfolder="vae")
    ref = diffusers.AutoencoderKL.from_pretrained(kl_dir / "vae").eval()
    assert tok.latent_channels == 4 and tok.downsample == 2 and tok.channel_axis == 1
    assert "vae" in tok.name and tok.normalization.kind == "constants"
    x = _images()
    with torch.no_grad():
        z = tok.encode(x)
        mode = ref.encode(x).latent_dist.mode()
        torch.testing.assert_close(z, (mode - 0.1) * 0.5)  # the pipeline's (z - shift) * scale
        img = tok.decode(z)
        torch.testing.assert_close(img, ref.decode(z / 0.5 + 0.1).sample.clamp(-1, 1))
    assert z.shape == (2, 4, 8, 8)


def test_latents_mean_std_config_is_per_channel(tmp_path) -> None:
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.0, 2.0, 0.5, 1.5]
    vae = diffusers.AutoencoderKL(latent_channels=4, scaling_factor=0.7, latents_mean=mean, latents_std=std, **TINY)
    vae.save_pretrained(tmp_path)
    tok = DiffusersTokenizer.from_pretrained(tmp_path)
    z = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    ref = (
        (z - torch.tensor(mean, dtype=torch.float64).view(1, 4, 1, 1))
        * 0.7
        / torch.tensor(std, dtype=torch.float64).view(1, 4, 1, 1)
    )
    torch.testing.assert_close(tok.normalization.normalize(z), ref)


def test_flux2_tokens_are_unpatchified_and_pipeline_normalised(flux2_dir) -> None:
    tok = DiffusersTokenizer.from_pretrained(flux2_dir, kind="flux2")
    vae = tok.vae
    assert tok.latent_channels == 4 and tok.normalization.kind == "batchnorm"
    x = _images(2, 16)
    with torch.no_grad():
        z = tok.encode(x)
        mode = vae.encode(x).latent_dist.mode()
        # Flux2Pipeline: patchify, normalise with bn running stats, (and we unpatchify back to tokens).
        b, c, h, w = mode.shape
        p = mode.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        pn = (p - mean) / std
        ref = pn.reshape(b, c, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w)
        torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tok.decode(z), vae.decode(mode).sample.clamp(-1, 1), rtol=1e-4, atol=1e-4)


def test_dtype_slicing_tiling_and_spherical(kl_dir) -> None:
    tok = DiffusersTokenizer.from_pretrained(kl_dir, subfolder="vae", dtype=torch.bfloat16, slicing=True, tiling=True)
    assert tok.dtype == torch.bfloat16 and tok.vae.use_slicing and tok.vae.use_tiling
    with torch.no_grad():
        z = tok.encode(_images(3))
    assert z.dtype == torch.bfloat16 and z.shape == (3, 4, 8, 8)
    sph = SphericalTokenizer(DiffusersTokenizer.from_pretrained(kl_dir, subfolder="vae"))
    with torch.no_grad():
        zs = sph.encode(_images())
        out = sph.decode(zs)
    torch.testing.assert_close(zs.norm(dim=1), torch.full((2, 8, 8), math.sqrt(4)), rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 3, 16, 16)
    assert set(sph.decoder_module().state_dict()) >= {"post_quant_conv.weight"}


def test_decoder_finetune_and_cli_on_a_diffusers_vae(kl_dir, tmp_path) -> None:
    """The same finetuning code path a GPU run uses, on the tiny VAE: two steps with the GAN already on."""
    from click.testing import CliRunner

    from manifold_fm.cli import main
    from manifold_fm.data.builtin_images import BuiltinImages
    from manifold_fm.training.decoder_finetune import finetune_decoder

    tok = DiffusersTokenizer.from_pretrained(kl_dir, subfolder="vae")
    ds = BuiltinImages("train", size=16, per_class=1)
    # 16 px images: LDM's PatchGAN with 2 layers (3 need >= 24 px)
    over = ["train.steps=2", "train.batch_size=4", "finetune.gan_start=0", "finetune.disc_layers=2"]
    res = finetune_decoder(tok, ds, None, over, eval_items=8, device="cpu", progress=False)
    state, rep = res.decoder_state, res.report
    assert {k.split(".")[0] for k in state} == {"post_quant_conv", "decoder"}
    assert rep["final_losses"]["gan_scale"] > 0
    sph = SphericalTokenizer(tok, state)
    with torch.no_grad():
        assert sph.decode(sph.encode(_images())).shape == (2, 3, 16, 16)
    r = CliRunner().invoke(
        main,
        [
            "extract-latents",
            "--tokenizer",
            str(kl_dir),
            "--subfolder",
            "vae",
            "--size",
            "16",
            "--per-class",
            "1",
            "--vae-slicing",
            "--vae-tiling",
            "--out",
            str(tmp_path / "c"),
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert "24 latents of shape [4, 8, 8]" in r.output


def test_load_errors(tmp_path, kl_dir) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        DiffusersTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        DiffusersTokenizer.from_pretrained(kl_dir, subfolder="vae", kind="vq")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="cannot load"):  # a hub id that is not cached (offline here)
        DiffusersTokenizer.from_pretrained("no-such-org/no-such-vae", local_files_only=True)
    assert load_tokenizer(str(kl_dir), subfolder="vae").latent_channels == 4


def test_an_image_run_names_its_diffusers_tokenizer_without_loading_it(kl_dir) -> None:
    """The checkpoint's tokenizer name of a run that never decodes is the name loading would give."""
    from manifold_fm.training.image import load_tokenizer as load_run_tokenizer
    from manifold_fm.training.image import tokenizer_name
    from manifold_fm.training.schema import load_image_config

    cfg = load_image_config(
        "image-builtin", ["tokenizer.kind=diffusers", f"tokenizer.name_or_path={kl_dir}", "tokenizer.subfolder=vae"]
    )
    assert tokenizer_name(cfg) == load_run_tokenizer(cfg).name
