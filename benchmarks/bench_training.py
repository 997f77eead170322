"""Image training throughput, linear vs spherical flow matching on the same SiT, and sampling time per image.

Both modes run through the real trainer (:class:`~manifold_fm.training.trainer.FlowTrainer`: class dropout, time
and prior sampling, path, forward, loss, backward, gradient clipping, AdamW, EMA) on the same latents, model
initialisation and seed. Steps are interleaved (linear, spherical, linear, ...) so both see the same machine load;
each step is timed in this process's CPU time (``time.process_time``, robust to other jobs on a shared machine) and
wall time, and the medians give images/s and the spherical overhead ratio ``spherical step / linear step``.

Sampling: EMA-free model, 12 classes, per solver (euler, heun, midpoint, rk4 at a fixed step count), time per image
of the flow solve only (the tokenizer decode is the same for both modes and reported separately).

    python benchmarks/bench_training.py            # writes benchmarks/results/training.{json,md}
    python benchmarks/bench_training.py --quick    # a smoke run (the test suite uses it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from manifold_fm.eval.sampling import SamplerSpec, generate_latents
from manifold_fm.models.sit import build_sit, count_parameters
from manifold_fm.training.image_config import load_image_config
from manifold_fm.training.trainer import FlowTrainer, TensorLatents, make_flow

RESULTS = Path(__file__).parent / "results"


def _timed(fn) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def bench_training(arch: str, shape: tuple[int, int, int], batch: int, steps: int, warmup: int) -> dict:
    c, h, _ = shape
    g = torch.Generator().manual_seed(0)
    data = TensorLatents(torch.randn(batch * 8, *shape, generator=g), torch.arange(batch * 8) % 12)
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("linear", "spherical"):
            cfg = load_image_config(None, ["tokenizer.kind=none", "data.source=latents", "data.latents=unused",
                                           f"flow.mode={mode}", f"train.batch_size={batch}", "train.seed=0"])
            torch.manual_seed(0)
            model = build_sit(arch, input_size=h, in_channels=c, num_classes=12)
            tr = FlowTrainer(model, make_flow(mode, c), data, cfg, Path(tmp) / mode, null_class=12, device="cpu",
                             progress=False)
            forward, raw = tr.prepare()
            trainers[mode] = (tr, forward, raw)
        times: dict[str, list[tuple[float, float]]] = {"linear": [], "spherical": []}
        batches = list(data.batches(trainers["linear"][0].indexer, 0, warmup + steps, 0))
        for i, (x1, y) in enumerate(batches):
            for mode, (tr, forward, raw) in trainers.items():
                t = _timed(lambda tr=tr, f=forward, r=raw, x1=x1, y=y: tr.train_step(f, r, x1, y))
                if i >= warmup:
                    times[mode].append(t)
    out: dict = {"arch": arch, "latent_shape": list(shape), "batch": batch, "steps": steps,
                 "params_M": count_parameters(trainers["linear"][0].model) / 1e6}
    for mode, ts in times.items():
        cpu = statistics.median(t[0] for t in ts)
        wall = statistics.median(t[1] for t in ts)
        out[mode] = {"cpu_s_per_step": cpu, "wall_s_per_step": wall, "images_per_s_cpu": batch / cpu,
                     "images_per_s_wall": batch / wall}
    out["spherical_overhead_cpu"] = out["spherical"]["cpu_s_per_step"] / out["linear"]["cpu_s_per_step"]
    out["spherical_overhead_wall"] = out["spherical"]["wall_s_per_step"] / out["linear"]["wall_s_per_step"]
    return out


@torch.no_grad()
def bench_sampling(arch: str, shape: tuple[int, int, int], n: int, steps: int, reps: int) -> list[dict]:
    c, h, _ = shape
    torch.manual_seed(0)
    model = build_sit(arch, input_size=h, in_channels=c, num_classes=12).eval()
    for p in model.final_layer.parameters():  # a non-zero field, like a trained model's
        p.normal_(0, 0.02)
    labels = torch.arange(n) % 12
    rows = []
    for method in ("euler", "heun", "midpoint", "rk4"):
        for mode in ("linear", "spherical"):
            flow = make_flow(mode, c)
            spec = SamplerSpec(method=method, steps=steps)
            generate_latents(model, flow, labels[:2], shape, spec, seed=0, null_class=12)  # warm-up
            ts = [_timed(lambda flow=flow, spec=spec: generate_latents(model, flow, labels, shape, spec, seed=0,
                                                                         null_class=12)) for _ in range(reps)]
            cpu = statistics.median(t[0] for t in ts)
            wall = statistics.median(t[1] for t in ts)
            rows.append({"method": method, "mode": mode, "steps": steps, "cpu_ms_per_image": 1e3 * cpu / n,
                         "wall_ms_per_image": 1e3 * wall / n})
    return rows


def to_markdown(res: dict) -> str:
    lines = [f"Machine: {res['machine']}, torch {res['torch']}, {res['threads']} thread(s); {res['date']}.", ""]
    lines += ["| SiT | latents | batch | linear img/s (CPU time) | spherical img/s | spherical overhead (CPU) | "
              "overhead (wall) |", "|---|---|---|---|---|---|---|"]
    for r in res["training"]:
        lines.append(f"| {r['arch']} ({r['params_M']:.2f}M) | {'x'.join(map(str, r['latent_shape']))} | {r['batch']} "
                     f"| {r['linear']['images_per_s_cpu']:.0f} | {r['spherical']['images_per_s_cpu']:.0f} | "
                     f"{r['spherical_overhead_cpu']:.3f}x | {r['spherical_overhead_wall']:.3f}x |")
    lines += ["", "| sampler | steps | linear ms/image (CPU) | spherical ms/image (CPU) | ratio |",
              "|---|---|---|---|---|"]
    by = {(r["method"], r["mode"]): r for r in res["sampling"]}
    for method in ("euler", "heun", "midpoint", "rk4"):
        lin, sph = by[(method, "linear")], by[(method, "spherical")]
        lines.append(f"| {method} | {lin['steps']} | {lin['cpu_ms_per_image']:.2f} | {sph['cpu_ms_per_image']:.2f} | "
                     f"{sph['cpu_ms_per_image'] / lin['cpu_ms_per_image']:.3f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few steps (smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        configs = [("SiT-Micro/2", (16, 8, 8), 8, 3, 1)]
        sampling = ("SiT-Micro/2", (16, 8, 8), 4, 2, 1)
    else:
        configs = [("SiT-Micro/2", (16, 8, 8), 64, 30, 5), ("SiT-Tiny/2", (16, 8, 8), 64, 10, 2)]
        sampling = ("SiT-Micro/2", (16, 8, 8), 48, 10, 3)
    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_start": os.getloadavg()[0],
        "training": [bench_training(*c) for c in configs],
        "sampling": bench_sampling(*sampling),
    }
    res["load_avg_end"] = os.getloadavg()[0]
    md = to_markdown(res)
    print(md)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "training.json").write_text(json.dumps(res, indent=2))
        (args.out / "training.md").write_text(md)


if __name__ == "__main__":
    main()
