"""Image training throughput, linear vs spherical flow matching on the same SiT, and sampling time per image.

Both modes run through the real trainer step (:meth:`~manifold_fm.training.trainer.Trainer.train_step`: class
dropout, time and prior sampling, path, forward, loss, backward, gradient clipping, AdamW, EMA) on the same latents,
model initialisation and seed. Steps are interleaved (linear, spherical, linear, ...) so both see the same machine
load; each step is timed in this process's CPU time (``time.process_time``, robust to other jobs on a shared machine)
and wall time (``manifold_fm/timing.py``), and the medians give images/s and the spherical overhead ratio
``spherical step / linear step``.

Sampling: EMA-free model, 12 classes, per solver (euler, heun, midpoint, rk4 at a fixed step count), time per image
of the flow solve only (:func:`manifold_fm.sampler.generate`; the tokenizer decode is the same for both modes and
not timed).

    python benchmarks/bench_training.py            # writes benchmarks/results/training.{json,md}
    python benchmarks/bench_training.py --quick --out /tmp/bench   # a smoke run (tiny sizes, seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor

from manifold_fm.atomic import write_text_atomic
from manifold_fm.data.sources import TensorSource
from manifold_fm.models.sit import build_sit, count_parameters
from manifold_fm.sampler import SamplerSpec, generate
from manifold_fm.timing import timed
from manifold_fm.training.builders import preset_flow
from manifold_fm.training.flow_objective import FlowObjective
from manifold_fm.training.schema import FLOW_PRESETS, load_image_config
from manifold_fm.training.trainer import Trainer

from reporting import add_output_options, command, output_dir, written_by

MODES = ("linear", "spherical")


def bench_training(arch: str, shape: tuple[int, int, int], batch: int, steps: int, warmup: int) -> dict:
    c, h, _ = shape
    g = torch.Generator().manual_seed(0)
    data = TensorSource(torch.randn(batch * 8, *shape, generator=g), torch.arange(batch * 8) % 12)
    with tempfile.TemporaryDirectory() as tmp:
        trainers: dict[str, Trainer] = {}
        for mode in MODES:
            overrides = [
                "tokenizer.kind=none",
                "data.source=latents",
                "data.latents=unused",
                f"flow.path={FLOW_PRESETS[mode]['path']}",
                f"train.batch_size={batch}",
                "train.seed=0",
            ]
            cfg = load_image_config(None, overrides)
            torch.manual_seed(0)
            model = build_sit(arch, input_size=h, in_channels=c, num_classes=12)
            tr = Trainer(
                FlowObjective(model, preset_flow(mode, c), cfg.optim, null_class=12),
                data,
                cfg.train,
                Path(tmp) / mode,
                device="cpu",
                progress=False,
            )
            tr.prepare()
            trainers[mode] = tr
        # The same batches for both modes (same plan), materialised before timing: the steps time the trainer only.
        batches = list(data.batches(trainers["linear"].plan, 0, warmup + steps))

        def stepper(tr: Trainer) -> Callable[[], object]:
            stream: Iterator[tuple[Tensor, Tensor | None]] = iter(batches)
            return lambda: tr.train_step(next(stream))

        times = timed({mode: stepper(trainers[mode]) for mode in MODES}, steps, warmup=warmup)
        params = count_parameters(trainers["linear"].model)
    out: dict = {"arch": arch, "latent_shape": list(shape), "batch": batch, "steps": steps, "params_M": params / 1e6}
    for mode, tm in times.items():
        out[mode] = {
            "cpu_s_per_step": tm.cpu_s,
            "wall_s_per_step": tm.wall_s,
            "images_per_s_cpu": batch / tm.cpu_s,
            "images_per_s_wall": batch / tm.wall_s,
        }
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
        spec = SamplerSpec(method=method, steps=steps)

        def sample(mode: str, spec: SamplerSpec = spec) -> Callable[[], object]:
            flow = preset_flow(mode, c)
            return lambda: generate(
                model,
                flow,
                (n, *shape),
                spec,
                generator=torch.Generator().manual_seed(0),
                labels=labels,
                null_class=12,
            )

        times = timed({mode: sample(mode) for mode in MODES}, reps)  # the modes interleaved, one warm-up round
        for mode, tm in times.items():
            rows.append(
                {
                    "method": method,
                    "mode": mode,
                    "steps": steps,
                    "cpu_ms_per_image": 1e3 * tm.cpu_s / n,
                    "wall_ms_per_image": 1e3 * tm.wall_s / n,
                }
            )
    return rows


def to_markdown(res: dict) -> str:
    lines = [
        f"Machine: {res['machine']}, torch {res['torch']}, {res['threads']} thread(s), load average "
        f"{res['load_avg_start']:.1f} at the start and {res['load_avg_end']:.1f} at the end; {res['date']}. "
        f"{written_by()}",
        "",
    ]
    lines += [
        "| SiT | latents | batch | linear img/s (CPU time) | spherical img/s | spherical overhead (CPU) | "
        "overhead (wall) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["training"]:
        lines.append(
            f"| {r['arch']} ({r['params_M']:.2f}M) | {'x'.join(map(str, r['latent_shape']))} | {r['batch']} "
            f"| {r['linear']['images_per_s_cpu']:.0f} | {r['spherical']['images_per_s_cpu']:.0f} | "
            f"{r['spherical_overhead_cpu']:.3f}x | {r['spherical_overhead_wall']:.3f}x |"
        )
    lines += [
        "",
        "| sampler | steps | linear ms/image (CPU) | spherical ms/image (CPU) | ratio |",
        "|---|---|---|---|---|",
    ]
    by = {(r["method"], r["mode"]): r for r in res["sampling"]}
    for method in ("euler", "heun", "midpoint", "rk4"):
        lin, sph = by[(method, "linear")], by[(method, "spherical")]
        lines.append(
            f"| {method} | {lin['steps']} | {lin['cpu_ms_per_image']:.2f} | {sph['cpu_ms_per_image']:.2f} | "
            f"{sph['cpu_ms_per_image'] / lin['cpu_ms_per_image']:.3f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    add_output_options(parser)
    args = parser.parse_args()
    out = output_dir(parser, args)
    torch.set_num_threads(args.threads)
    if args.quick:
        configs = [("SiT-Micro/2", (16, 8, 8), 8, 3, 1)]
        sampling = ("SiT-Micro/2", (16, 8, 8), 4, 2, 1)
    else:
        configs = [("SiT-Micro/2", (16, 8, 8), 64, 30, 5), ("SiT-Tiny/2", (16, 8, 8), 64, 10, 2)]
        sampling = ("SiT-Micro/2", (16, 8, 8), 48, 10, 3)
    res = {
        "command": command(),
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
    write_text_atomic(out / "training.json", json.dumps(res, indent=2))
    write_text_atomic(out / "training.md", md)


if __name__ == "__main__":
    main()
