"""Planning arithmetic for the ImageNet-256 runs: FLOPs per image of each SiT of the grid, FLOPs of an 80-epoch
run, and the wall-clock time on N GPUs at an *assumed* model-FLOPs utilisation. A formula, not a measurement: the
MFU is an input (replace it with the one ``experiments/imagenet_sfm/gpu_check.sh`` measures).

    python benchmarks/compute_budget.py                      # writes benchmarks/results/compute_budget.{json,md}
    python benchmarks/compute_budget.py --mfu 0.5 --gpus 8 32
    python benchmarks/compute_budget.py --quick --out /tmp/bench   # the same arithmetic (it takes seconds anyway)

FLOPs come from :func:`manifold_fm.models.sit.sit_forward_flops` (2 FLOP per multiply-add; training ~ 3x forward)
on a meta-device model (no memory); the peak is the dense bf16 peak of the GPU named (the one table in
``experiments/imagenet_sfm/gpu_check.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from manifold_fm.atomic import write_text_atomic
from manifold_fm.models.sit import build_sit, sit_forward_flops

from reporting import add_output_options, command, output_dir, written_by

ROOT = Path(__file__).resolve().parent.parent
IMAGENET_TRAIN_IMAGES = 1_281_167
# (name, arch, latent channels, latent side) at 256 px: FLUX.2 and REPA-E FLUX.1 f8, VA-VAE f16, SD-VAE f8
MODELS = [
    ("FLUX.2 SiT-B/2", "SiT-B/2", 32, 32),
    ("FLUX.2 SiT-XL/2", "SiT-XL/2", 32, 32),
    ("VA-VAE SiT-B/1", "SiT-B/1", 32, 16),
    ("VA-VAE SiT-XL/1", "SiT-XL/1", 32, 16),
]


def _peak_table() -> dict[str, float]:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "experiments" / "imagenet_sfm" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return dict(module.PEAK_BF16_FLOPS)


def budget(epochs: int, mfu: float, gpus: list[int], gpu: str) -> dict:
    peak = _peak_table()[gpu]
    rows = []
    for name, arch, channels, side in MODELS:
        with torch.device("meta"):
            model = build_sit(arch, input_size=side, in_channels=channels, num_classes=1000)
        forward = sit_forward_flops(model)
        total = 3 * forward * IMAGENET_TRAIN_IMAGES * epochs
        hours = {str(n): total / (n * peak * mfu) / 3600 for n in gpus}
        params = sum(p.numel() for p in model.parameters())
        rows.append(
            {
                "run": name,
                "arch": arch,
                "latent": [channels, side, side],
                "tokens": model.num_patches,
                "params": params,
                "checkpoint_gb": 16 * params / 1e9,  # float32 weights + EMA + AdamW moments
                "forward_gflop_per_image": forward / 1e9,
                "train_flop": total,
                "hours_on": hours,
            }
        )
    return {
        "command": command(),
        "epochs": epochs,
        "images_per_epoch": IMAGENET_TRAIN_IMAGES,
        "gpu": gpu,
        "peak_bf16_flops": peak,
        "assumed_mfu": mfu,
        "rows": rows,
    }


def table(result: dict) -> str:
    gpus = list(result["rows"][0]["hours_on"])
    head = " | ".join(f"hours on {n} x {result['gpu']}" for n in gpus)
    lines = [
        f"| run | parameters | checkpoint GB | tokens | forward GFLOP/image | training FLOP ({result['epochs']} "
        f"epochs) | {head} |",
        "|---|---|---|---|---|---|" + "---|" * len(gpus),
    ]
    for r in result["rows"]:
        hours = " | ".join(f"{r['hours_on'][n]:.1f}" for n in gpus)
        lines.append(
            f"| {r['run']} | {r['params'] / 1e6:.1f}M | {r['checkpoint_gb']:.1f} | {r['tokens']} | "
            f"{r['forward_gflop_per_image']:.1f} | {r['train_flop']:.2g} | {hours} |"
        )
    lines.append("")
    lines.append(
        f"Formula, not a measurement: training FLOP = 3 x forward x {result['images_per_epoch']:,} images x "
        f"{result['epochs']} epochs; hours = FLOP / (GPUs x {result['peak_bf16_flops'] / 1e12:.1f} TFLOP/s "
        f"dense bf16 x an assumed MFU of {result['assumed_mfu']:.0%}), compute only (no data loading, "
        "communication or evaluation). A checkpoint holds float32 weights, EMA weights and AdamW's two "
        f"moments (16 bytes per parameter). {written_by()}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation (a goal)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--gpu", default="H200", help="a name of gpu_check.py's peak table")
    add_output_options(parser)
    args = parser.parse_args()
    out = output_dir(parser, args)
    if not 0 < args.mfu <= 1:
        raise SystemExit("--mfu must be in (0, 1]")
    result = budget(args.epochs, args.mfu, args.gpus, args.gpu)
    write_text_atomic(out / "compute_budget.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out / "compute_budget.md", table(result) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
