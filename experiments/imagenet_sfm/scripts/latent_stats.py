#!/usr/bin/env python
"""Per-channel latent statistics of a diffusers ``AutoencoderKL``, baked into a derived VAE folder.

For tokenizers whose own preprocessing is a per-channel standardisation computed over the data (VA-VAE in
LightningDiT, and any ``AutoencoderKL`` without usable constants), the linear baseline normalises each channel ``c``
as ``(z_c - mean_c) / std_c``, with ``mean_c`` and ``std_c`` pooled over every spatial position of the raw
posterior-mode latents of ``--max-items`` images spread evenly over the dataset (so every class contributes),
accumulated in float64 (:func:`manifold_fm.tokenizers.compute_channel_stats`).

The output folder is a copy of the VAE folder whose ``config.json`` carries ``latents_mean`` / ``latents_std`` (and
``scaling_factor = 1``, ``shift_factor = null``); the weights are symlinked (``--copy`` to copy them). Every
command that loads the tokenizer from that folder -- ``extract-latents``, the trainer's sample grids,
``manifold-fm sample`` -- then applies the same normalisation, because the diffusers adapter reads those config keys
as the tokenizer's own constants: no separate statistics file has to be threaded through the configs. The folder
also holds ``latent_stats.json`` (the :class:`~manifold_fm.tokenizers.LatentNormalization` record, usable as
``--normalization`` of the CLI commands).

Usage::

    python experiments/imagenet_sfm/scripts/latent_stats.py --vae weights/vavae-f16d32-diffusers \
        --data data/imagenet256 --out weights/vavae-f16d32-stats --max-items 50000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any


def even_indices(n: int, k: int) -> list[int]:
    """``min(k, n)`` indices spread evenly over ``range(n)`` (the dataset is sorted by class)."""
    k = min(k, n)
    return [(i * n) // k for i in range(k)]


def _check_kl_config(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") not in (None, "AutoencoderKL"):
        raise ValueError(
            f"{folder} holds a {config.get('_class_name')}; per-channel statistics apply to AutoencoderKL folders "
            "(FLUX.2's VAE normalises with its own batch-norm statistics)"
        )
    return config


def derive_vae_folder(src: Path, dst: Path, mean: list[float], std: list[float], copy: bool = False) -> Path:
    """``dst``: ``src``'s files with ``latents_mean``/``latents_std`` in ``config.json`` (written atomically)."""
    if src.resolve() == dst.resolve():
        raise ValueError("--out must differ from --vae (the original folder is never modified)")
    config = _check_kl_config(src)
    channels = int(config["latent_channels"])
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"statistics have {len(mean)} channels, the VAE has {channels}")
    config.update(latents_mean=mean, latents_std=std, scaling_factor=1.0, shift_factor=None)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name == "config.json" or not f.is_file():
            continue
        target = dst / f.name
        if target.exists() or target.is_symlink():
            target.unlink()
        if copy:
            shutil.copy2(f, target)
        else:
            target.symlink_to(f.resolve())
    tmp = dst / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, dst / "config.json")
    return dst


def compute(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.utils.data import Subset

    from manifold_fm.data.image_folder import image_dataset
    from manifold_fm.tokenizers import compute_channel_stats, load_tokenizer

    vae_dir = Path(args.vae) / (args.subfolder or "")
    if not (vae_dir / "config.json").is_file():
        raise FileNotFoundError(f"{vae_dir} has no config.json; pass a diffusers-format AutoencoderKL folder")
    _check_kl_config(vae_dir)
    tok = load_tokenizer(
        str(args.vae), subfolder=args.subfolder, kind="kl", dtype=getattr(torch, args.dtype), device=args.device
    )
    dataset = image_dataset(args.data, size=args.size)
    subset = Subset(dataset, even_indices(len(dataset), args.max_items))
    with torch.no_grad():
        norm = compute_channel_stats(tok, subset, batch_size=args.batch_size, progress=not args.no_progress)
    mean = norm.shift.reshape(-1).tolist()
    std = (1.0 / norm.scale.reshape(-1)).tolist()
    out = derive_vae_folder(vae_dir, Path(args.out), mean, std, copy=args.copy)
    norm.meta.update(items=len(subset), data=str(args.data), source_vae=str(vae_dir))
    norm.save(out / "latent_stats.json")
    return {"out": str(out), "items": len(subset), "mean": mean, "std": std}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder (holding config.json)")
    parser.add_argument("--subfolder", default=None)
    parser.add_argument("--data", required=True, help="image folder, one sub-folder per class (or 'builtin')")
    parser.add_argument("--out", required=True, help="the derived VAE folder to write")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--max-items", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--copy", action="store_true", help="copy the weights instead of symlinking them")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_items < 2:
        parser.error("--max-items must be at least 2")
    try:
        result = compute(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"per-channel statistics of {result['items']} images written into {result['out']} (config.json, "
        "latent_stats.json)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
