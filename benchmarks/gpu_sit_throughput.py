"""SiT training throughput and model FLOPs utilisation (MFU) on one GPU in bf16, linear vs spherical flow matching.

Runs the real trainer step (:meth:`FlowTrainer.train_step`: class dropout, time/prior sampling, path, SiT forward
under bf16 autocast, float32 loss, backward, gradient clipping, AdamW, EMA) on synthetic latents (no data or
weights needed), for the linear baseline and spherical flow matching in the same process, interleaved.

MFU = ``3 * forward_FLOPs_per_image * images_per_s / peak_bf16_FLOPs`` (forward + backward ~ 3x forward; FLOPs
from :func:`manifold_fm.models.sit.sit_forward_flops`, matmuls and attention only). The peak is looked up from the
device name (dense bf16) or given with ``--peak-tflops``.

    python benchmarks/gpu_sit_throughput.py                         # SiT-B/2, 4x32x32 latents, batch 256
    python benchmarks/gpu_sit_throughput.py --compile --batch 512
    python benchmarks/gpu_sit_throughput.py --dry-run               # tiny, on the CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from manifold_fm.models.sit import build_sit, count_parameters, sit_forward_flops
from manifold_fm.training.image_config import load_image_config
from manifold_fm.training.trainer import FlowTrainer, TensorLatents, make_flow

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "RTX 4090": 165.0}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def run(arch: str, shape: tuple[int, int, int], batch: int, steps: int, warmup: int, compile_: bool,
        device: str) -> dict:
    c, h, _ = shape
    # Synthetic latents on the device (no loader in the loop): measures the model and the flow, not the data path.
    data = TensorLatents(torch.randn(batch * 4, *shape, device=device), torch.arange(batch * 4, device=device) % 1000)
    mp = "bf16" if device == "cuda" else "no"
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("linear", "spherical"):
            cfg = load_image_config(None, ["tokenizer.kind=none", "data.source=latents", "data.latents=unused",
                                           f"flow.mode={mode}", f"train.batch_size={batch}",
                                           f"train.mixed_precision={mp}", f"train.compile={str(compile_).lower()}"])
            torch.manual_seed(0)
            model = build_sit(arch, input_size=h, in_channels=c, num_classes=1000)
            tr = FlowTrainer(model, make_flow(mode, c), data, cfg, Path(tmp) / mode, null_class=1000,
                             device=device, progress=False)
            trainers[mode] = (tr, *tr.prepare())
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        times: dict[str, list[float]] = {"linear": [], "spherical": []}
        indexer = trainers["linear"][0].indexer
        for i, (x1, y) in enumerate(data.batches(indexer, 0, warmup + steps, 0)):
            for mode, (tr, forward, raw) in trainers.items():
                sync()
                t0 = time.perf_counter()
                tr.train_step(forward, raw, x1, y)
                sync()
                if i >= warmup:
                    times[mode].append(time.perf_counter() - t0)
        model = trainers["linear"][0].accelerator.unwrap_model(trainers["linear"][1])
        flops = sit_forward_flops(model, batch=1)
        params = count_parameters(model)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_tflops(name)
    out = {"device": name, "arch": arch, "params_M": params / 1e6, "latent_shape": list(shape), "batch": batch,
           "steps": steps, "compile": compile_, "mixed_precision": mp, "forward_gflops_per_image": flops / 1e9,
           "peak_bf16_tflops": peak}
    for mode, ts in times.items():
        s = statistics.median(ts)
        ips = batch / s
        out[mode] = {"s_per_step": s, "images_per_s": ips,
                     "mfu": (3 * flops * ips / (peak * 1e12)) if peak else None}
    out["spherical_overhead"] = out["spherical"]["s_per_step"] / out["linear"]["s_per_step"]
    if device == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="SiT-B/2")
    parser.add_argument("--latent", default="4x32x32", help="C x H x W of the latents (SD-VAE at 256 px: 4x32x32)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense bf16 peak")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, 2 steps: checks the script")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = parser.parse_args()
    if args.dry_run:
        torch.set_num_threads(1)
        res = run("SiT-Micro/2", (4, 8, 8), 4, 2, 1, False, "cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run to check the script on a CPU")
        if args.peak_tflops:
            PEAK_BF16_TFLOPS[torch.cuda.get_device_name()] = args.peak_tflops
        c, h, w = (int(v) for v in args.latent.lower().split("x"))
        res = run(args.arch, (c, h, w), args.batch, args.steps, args.warmup, args.compile, "cuda")
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
