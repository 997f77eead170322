"""LDM-layout autoencoder checkpoints (VA-VAE, SD-VAE, taming KL-VQGAN) -> diffusers ``AutoencoderKL`` folders.

The key conversion is diffusers' own single-file machinery (``diffusers.loaders.single_file_utils``:
``create_vae_diffusers_config_from_ldm`` builds the config from an LDM ``ddconfig``, ``convert_ldm_vae_checkpoint``
renames the tensors, ``update_vae_attentions_ldm_to_diffusers`` renames attention blocks). What diffusers'
converter leaves out, this module adds on top of it:

- the ``ddconfig`` is read from the tensor shapes (``ch``, ``ch_mult``, ``num_res_blocks``, ``z_channels``,
  in/out channels), so no LDM YAML is needed;
- attention inside resolution levels (LDM's ``attn_resolutions``; VA-VAE f16d32 has attention at its 16x16 level,
  encoder and decoder): those levels become diffusers' ``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D``,
  whose blocks compute LDM's single-head ``AttnBlock``, and their tensors are renamed with diffusers' attention
  helper;
- checkpoints without a mid-block attention or without quant convolutions set ``mid_block_add_attention`` /
  ``use_quant_conv`` / ``use_post_quant_conv`` accordingly.

The converted model is loaded strictly, and every encoder/decoder tensor of the checkpoint must be used (their
element counts must add up), so a layout this does not understand fails loudly instead of converting partly.
Entries outside the autoencoder (``loss.*``: LPIPS, the discriminator; VA-VAE's ``foundation_model.*``) are left out.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from manifold_fm.errors import InputError

from .state_files import load_state_file, tensor_state

_AE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def _strip_prefix(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The autoencoder's tensors with a pipeline prefix (``first_stage_model.``, ``vae.``) removed."""
    from diffusers.loaders.single_file_utils import LDM_VAE_KEYS

    for prefix in LDM_VAE_KEYS:
        if any(k.startswith(prefix + "encoder.") for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in tensors.items() if k.startswith(_AE_PREFIXES)}


def _indices(keys: Sequence[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_ldm_ddconfig(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """LDM's ``ddconfig`` (plus the per-level attention this module needs) from an autoencoder state dict.

    Returns ``ch, ch_mult, num_res_blocks, in_channels, out_ch, z_channels, double_z, embed_dim`` and
    ``encoder_attn_levels`` / ``decoder_attn_levels`` (resolution levels with attention blocks, 0 = full
    resolution), ``mid_attention``, ``quant_conv``, ``post_quant_conv``.
    """
    keys = list(state)
    need = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight", "decoder.conv_out.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise InputError(
            f"not an LDM-layout autoencoder: {', '.join(missing)} missing (expected encoder.* / decoder.* keys, "
            "optionally under first_stage_model. or state_dict)"
        )
    if any(".attn.0.qkv" in k or ".attn_1.qkv" in k for k in keys):
        raise InputError("linear / fused-qkv attention blocks are not convertible to diffusers' AutoencoderKL")
    ch = int(state["encoder.conv_in.weight"].shape[0])
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise InputError(f"encoder.down.<i> levels are not 0..n-1 (found {levels})")
    blocks = _indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")
    ch_mult = [int(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch for i in levels]
    z = int(state["decoder.conv_in.weight"].shape[1])
    enc_out = int(state["encoder.conv_out.weight"].shape[0])
    up_blocks = _indices(keys, r"decoder\.up\.0\.block\.(\d+)\.")
    if len(up_blocks) != len(blocks) + 1:
        raise InputError(
            f"decoder levels have {len(up_blocks)} blocks, encoder levels {len(blocks)}: LDM's decoder has one more"
        )
    embed = int(state["post_quant_conv.weight"].shape[1]) if "post_quant_conv.weight" in state else z
    return {
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": len(blocks),
        "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
        "out_ch": int(state["decoder.conv_out.weight"].shape[0]),
        "z_channels": z,
        "double_z": enc_out == 2 * z,
        "embed_dim": embed,
        "encoder_attn_levels": _indices(keys, r"encoder\.down\.(\d+)\.attn\.0\."),
        "decoder_attn_levels": _indices(keys, r"decoder\.up\.(\d+)\.attn\.0\."),
        "mid_attention": "encoder.mid.attn_1.q.weight" in state,
        "quant_conv": "quant_conv.weight" in state,
        "post_quant_conv": "post_quant_conv.weight" in state,
    }


def convert_ldm_vae_state(
    checkpoint: Mapping[str, Any],
    *,
    sample_size: int = 256,
    scaling_factor: float = 1.0,
    shift_factor: float | None = None,
    latents_mean: Sequence[float] | None = None,
    latents_std: Sequence[float] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, state_dict)`` of a diffusers ``AutoencoderKL`` equal to the LDM autoencoder in ``checkpoint``.

    ``checkpoint``: a state dict or a Lightning/LDM checkpoint mapping (``"state_dict"`` is unwrapped; keys may
    carry ``first_stage_model.`` or ``vae.``). The normalisation constants go into the config, where
    :class:`~manifold_fm.tokenizers.DiffusersTokenizer` reads them (``(z - shift) * scale``, or per channel
    ``(z - mean_c) * scale / std_c`` with ``latents_mean`` / ``latents_std``).
    """
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        create_vae_diffusers_config_from_ldm,
        update_vae_attentions_ldm_to_diffusers,
    )

    state = _strip_prefix(tensor_state(checkpoint))
    dd = infer_ldm_ddconfig(state)
    if not dd["double_z"]:
        raise InputError("the encoder does not output mean and log-variance (double_z); AutoencoderKL needs it")
    if dd["embed_dim"] != dd["z_channels"]:
        raise InputError(
            f"embed_dim {dd['embed_dim']} != z_channels {dd['z_channels']}: diffusers' AutoencoderKL has one "
            "latent width for the quant convolutions and the decoder"
        )
    if (latents_mean is None) != (latents_std is None):
        raise InputError("give both latents_mean and latents_std, or neither")
    ldm_config = {
        "model": {
            "params": {
                "scale_factor": scaling_factor,
                "first_stage_config": {"params": {"ddconfig": {**dd, "resolution": sample_size}}},
            }
        }
    }
    config = dict(create_vae_diffusers_config_from_ldm(ldm_config, state, scaling_factor=scaling_factor))
    n = len(dd["ch_mult"])
    config["sample_size"] = sample_size
    config["down_block_types"] = [
        "AttnDownEncoderBlock2D" if i in dd["encoder_attn_levels"] else "DownEncoderBlock2D" for i in range(n)
    ]
    # diffusers' up block j is LDM's resolution level n-1-j
    config["up_block_types"] = [
        "AttnUpDecoderBlock2D" if n - 1 - j in dd["decoder_attn_levels"] else "UpDecoderBlock2D" for j in range(n)
    ]
    config["mid_block_add_attention"] = dd["mid_attention"]
    config["use_quant_conv"] = dd["quant_conv"]
    config["use_post_quant_conv"] = dd["post_quant_conv"]
    if shift_factor is not None:
        config["shift_factor"] = float(shift_factor)
    if latents_mean is not None and latents_std is not None:
        if len(latents_mean) != dd["z_channels"] or len(latents_std) != dd["z_channels"]:
            raise InputError(
                f"latents_mean / latents_std need {dd['z_channels']} values (one per latent channel), "
                f"got {len(latents_mean)} and {len(latents_std)}"
            )
        config["latents_mean"] = [float(v) for v in latents_mean]
        config["latents_std"] = [float(v) for v in latents_std]

    new = convert_ldm_vae_checkpoint(dict(state), config)
    # diffusers' converter leaves attention blocks inside resolution levels under their LDM names: drop those
    # and rename them with diffusers' attention helper.
    new = {k: v for k, v in new.items() if not k.startswith(("encoder.down.", "decoder.up."))}
    for i in dd["encoder_attn_levels"]:
        keys = [k for k in state if k.startswith(f"encoder.down.{i}.attn.")]
        update_vae_attentions_ldm_to_diffusers(
            keys, new, state, mapping={"old": f"down.{i}.attn", "new": f"down_blocks.{i}.attentions"}
        )
    for i in dd["decoder_attn_levels"]:
        keys = [k for k in state if k.startswith(f"decoder.up.{i}.attn.")]
        update_vae_attentions_ldm_to_diffusers(
            keys, new, state, mapping={"old": f"up.{i}.attn", "new": f"up_blocks.{n - 1 - i}.attentions"}
        )
    used = sum(v.numel() for v in new.values())
    total = sum(v.numel() for v in state.values())
    if used != total:
        raise InputError(
            f"only {used} of the checkpoint's {total} autoencoder weights were converted: a block layout this "
            "converter does not know"
        )
    return config, {k: v.contiguous() for k, v in new.items()}


def build_autoencoder_kl(config: Mapping[str, Any], state: Mapping[str, Tensor]) -> Any:
    """A diffusers ``AutoencoderKL`` from ``config`` with ``state`` loaded strictly (one-line error otherwise)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(dict(config))
    try:
        vae.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise InputError(f"converted weights do not fit diffusers' AutoencoderKL: {detail}") from None
    return vae.eval()


def _stats_vectors(path: str | Path, trust_pickle: bool) -> tuple[list[float], list[float]]:
    obj = load_state_file(path, "latent statistics", trust_pickle=trust_pickle)
    if not ("mean" in obj and "std" in obj):
        raise InputError(f"latent statistics {path} need 'mean' and 'std' entries (LightningDiT's latents_stats.pt)")
    return [float(v) for v in torch.as_tensor(obj["mean"]).flatten()], [
        float(v) for v in torch.as_tensor(obj["std"]).flatten()
    ]


def convert_ldm_vae(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    sample_size: int = 256,
    scaling_factor: float = 1.0,
    shift_factor: float | None = None,
    latents_stats: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Convert an LDM-layout autoencoder checkpoint file into a diffusers ``AutoencoderKL`` folder ``out_dir``
    (``config.json`` + ``diffusion_pytorch_model.safetensors``), written to a temporary folder and renamed.

    ``latents_stats``: a file with per-channel ``mean`` and ``std`` (LightningDiT's ``latents_stats.pt``) stored as
    the config's ``latents_mean`` / ``latents_std``. ``out_dir`` must not exist or be empty. Returns a summary
    (config, tensors converted, entries left out).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder; choose another --out")
    raw = load_state_file(checkpoint, "autoencoder checkpoint", trust_pickle=trust_pickle)
    tensors = tensor_state(raw)
    mean = std = None
    if latents_stats is not None:
        mean, std = _stats_vectors(latents_stats, trust_pickle)
    config, state = convert_ldm_vae_state(
        tensors,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        latents_mean=mean,
        latents_std=std,
    )
    vae = build_autoencoder_kl(config, state).to(dtype)
    tmp = out.with_name(f".{out.name}.tmp-convert")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        vae.save_pretrained(str(tmp), safe_serialization=True)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    kept = set(_strip_prefix(tensors))
    left_out = sorted({k.split(".")[0] for k in tensors if k.split(".", 1)[-1] not in kept and k not in kept})
    return {
        "out": str(out),
        "config": {k: v for k, v in vae.config.items() if not k.startswith("_")},
        "tensors": len(state),
        "parameters": sum(v.numel() for v in state.values()),
        "left_out": left_out,
    }
