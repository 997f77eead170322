#!/usr/bin/env python
"""Write the ImageNet-256 config grid to ``experiments/imagenet_sfm/configs/`` from one table (the single source).

Every run is a linear/spherical *pair* generated from the same settings, so a pair can only differ in the keys that
define the method (``flow.path``: geodesic for spherical flow matching on spherical latents, linear for the vanilla
baseline; the decoder finetuned for projected tokens; and the run name). Both runs of a pair
read the same latent cache: spherical runs project its denormalised (raw) latents;
``tests/test_imagenet_configs.py`` checks the committed files against this generator and diffs each pair.

Grid (the paper's, see the README): tokenizers FLUX.2 (d=32, f=8, SiT patch 2), VA-VAE f16d32 (patch 1),
REPA-E FLUX.1 E2E VAE (d=16, f=8, patch 2) and SD-VAE-ft-ema (d=4, f=8, patch 2, the classic baseline); SiT-B and
SiT-XL; 80 epochs; plus the 200-epoch FLUX.2 B/2 pair; plus the ablation's two middle arms (``shell`` and
``spherical-linear``, FLUX.2 B/2, 80 epochs) beside that grid's linear/spherical pair. Every config names its flow
by the five settings of its preset (``manifold_fm.training.schema.FLOW_PRESETS``).

Paths are relative to the directory the run is launched from (the README's layout: ``weights/``, ``data/``,
``runs/``); change any of them at launch with ``--set key=value``. Usage::

    python experiments/imagenet_sfm/scripts/make_configs.py            # rewrite the YAML files
    python experiments/imagenet_sfm/scripts/make_configs.py --check    # exit 1 if the files are out of date
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from manifold_fm.training.schema import FLOW_PRESETS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
IMAGENET_TRAIN_IMAGES = 1_281_167
BATCH = 256
STEPS_PER_EPOCH = math.ceil(IMAGENET_TRAIN_IMAGES / BATCH)  # 5005, the last batch of an epoch partial


@dataclass(frozen=True)
class Tokenizer:
    """One autoencoder of the grid: where its weights come from and its token shape."""

    key: str
    title: str
    name_or_path: str
    subfolder: str | None
    vae_kind: str
    channels: int
    downsample: int
    patch: int


TOKENIZERS: dict[str, Tokenizer] = {
    t.key: t
    for t in (
        # FLUX.2's VAE: AutoencoderKLFlux2; the paper's tokens are its 32 channels at 8x (before the 2x2 patchify).
        Tokenizer("flux2", "FLUX.2 VAE", "weights/flux2-vae", None, "flux2", 32, 8, 2),
        # VA-VAE f16d32 (LightningDiT): the original checkpoint is not in diffusers format; a local port is needed.
        Tokenizer("vavae", "VA-VAE f16d32", "weights/vavae-f16d32-diffusers", None, "kl", 32, 16, 1),
        # REPA-E end-to-end tuned FLUX.1 VAE (AutoencoderKL, d=16).
        Tokenizer("repae-flux1", "REPA-E FLUX.1 E2E VAE", "weights/repae-e2e-flux-vae", None, "kl", 16, 8, 2),
        # SD-VAE-ft-ema: the classic DiT/SiT baseline (d=4).
        Tokenizer("sdvae", "SD-VAE-ft-ema", "weights/sd-vae-ft-ema", None, "kl", 4, 8, 2),
    )
}
SCALES = ("B", "XL")
MODES = ("linear", "spherical")
# The paper's ablation (FID-50K at CFG 1.0, SiT-B/2 on FLUX.2, 80 epochs): its four arms, as flow presets.
ABLATION = ("flux2", "B", 80)
ABLATION_MODES = ("linear", "shell", "spherical-linear", "spherical")


def run_name(tok: str, scale: str, mode: str, epochs: int) -> str:
    patch = TOKENIZERS[tok].patch
    return f"{tok}-{scale}{patch}-{mode}-{epochs}ep"


def make_config(tok: str, scale: str, mode: str, epochs: int) -> dict[str, Any]:
    """The config mapping of one run (``kind: image``, the schema of ``manifold_fm.training.schema``)."""
    t = TOKENIZERS[tok]
    spherical = FLOW_PRESETS[mode]["latent"] == "spherical"
    return {
        "kind": "image",
        "name": run_name(tok, scale, mode, epochs),
        "model": {"arch": f"SiT-{scale}/{t.patch}", "time_scale": 1.0},
        "tokenizer": {
            "kind": "diffusers",
            "name_or_path": t.name_or_path,
            "subfolder": t.subfolder,
            "vae_kind": t.vae_kind,
            "cache_dir": None,
            # Spherical runs decode projected latents with the decoder finetuned for them (finetune-decoder);
            # the linear baseline keeps the tokenizer's own decoder.
            "decoder_state": f"runs/decoders/{tok}/decoder.safetensors" if spherical else None,
        },
        "data": {
            "source": "latents",
            # One cache (the tokenizer's own normalisation) serves both runs of a pair: spherical runs read it
            # denormalised with its manifest's normalisation and project every token of that *raw* encoder output to
            # radius sqrt(d), exactly what SphericalTokenizer (and so the finetuned decoder) uses. README, step 3.
            "latents": f"data/latents/{tok}",
            "size": 256,
            "seed": 0,
            "num_workers": 8,
        },
        # The flow preset's five settings: `spherical` = spherical latents, uniform prior, slerp, tangent loss,
        # exp-map sampler; `linear` = vanilla latents, Gaussian prior, straight path, ambient Euler; the ablation's
        # `shell` and `spherical-linear` in between.
        "flow": {
            **FLOW_PRESETS[mode],
            "time": "uniform",
            "time_mean": 0.0,
            "time_std": 1.0,
            "time_shift": 1.0,
            "coupling": "independent",
        },
        "optim": {
            "lr": 1.0e-4,
            "weight_decay": 0.0,
            "betas": [0.9, 0.999],
            "eps": 1.0e-8,
            "warmup_steps": 0,
            "grad_clip": 1.0,
        },
        "train": {
            "steps": epochs * STEPS_PER_EPOCH,
            "batch_size": BATCH,
            "seed": 0,
            "class_dropout": 0.1,
            "ema_decay": 0.9999,
            "ema_warmup": 0,
            "mixed_precision": "bf16",
            "compile": False,
            # A checkpoint every epoch, so a crash loses at most one; of those only the newest is kept, besides every
            # 10th epoch's (kept for FID over training: `manifold-fm sample` on each).
            "checkpoint_every": STEPS_PER_EPOCH,
            "keep_checkpoints": 1,
            "keep_every": 10 * STEPS_PER_EPOCH,
            "log_every": 100,
            # No grids during training: the trainer's grid hook draws num_classes x grid_per_class samples (1000
            # here) on the main process alone while the others wait. Use `manifold-fm sample RUN --num 64` on any
            # checkpoint instead.
            "sample_every": None,
            "eval_every": None,
            "threads": None,
        },
        "sample": {
            "method": "euler",
            "steps": 250,
            "cfg_scale": 1.0,
            "cfg_interval": None,
            "grid_per_class": 1,
            "seed": 0,
        },
    }


def grid() -> dict[str, dict[str, Any]]:
    """File stem -> config mapping for every run of the grid."""
    runs = [(tok, scale, 80) for tok in TOKENIZERS for scale in SCALES] + [("flux2", "B", 200)]
    out = {
        run_name(tok, scale, mode, ep): make_config(tok, scale, mode, ep) for tok, scale, ep in runs for mode in MODES
    }
    tok, scale, ep = ABLATION
    out.update({run_name(tok, scale, mode, ep): make_config(tok, scale, mode, ep) for mode in ABLATION_MODES})
    return out


def render(name: str, cfg: dict[str, Any]) -> str:
    """YAML text with a header naming the tokenizer, the model, the flow preset and the budget."""
    t = next(t for t in TOKENIZERS.values() if name.startswith(t.key + "-"))
    steps = cfg["train"]["steps"]
    flow = {k: cfg["flow"][k] for k in ("latent", "prior", "path", "projection", "sampler")}
    preset = next(p for p, fields in FLOW_PRESETS.items() if fields == flow)
    header = (
        f"# {name}: {t.title} (d={t.channels}, f={t.downsample}) + {cfg['model']['arch']}, {preset} flow"
        f" matching,\n# {steps} steps x batch {BATCH} = {steps // STEPS_PER_EPOCH} epochs of ImageNet-1k train"
        f" ({STEPS_PER_EPOCH} steps/epoch).\n"
        "# Generated by experiments/imagenet_sfm/scripts/make_configs.py: edit the generator, not this file.\n"
    )
    return header + yaml.safe_dump(cfg, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) the ImageNet-256 config grid.")
    parser.add_argument("--check", action="store_true", help="exit 1 when a file differs from the generator")
    parser.add_argument("--out", type=Path, default=CONFIG_DIR)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stale = []
    for name, cfg in grid().items():
        path = args.out / f"{name}.yaml"
        text = render(name, cfg)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
            continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    if stale:
        print(f"out of date: {', '.join(stale)}; run {Path(__file__).name} without --check", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
