"""CPU threads: seconds per batch of 64 of ``manifold-fm sample`` on a tiny image run, at 1 and at 2 torch threads.

This measurement chose ``manifold_fm.threads.DEFAULT_THREADS``, the thread count of every compute command without
``--threads``. It trains the built-in ``image-builtin`` config for a few steps (the network's size, not its quality,
sets the time) and then times what ``sample`` runs for each batch (:func:`manifold_fm.training.runs.sample_run`:
the run's sampler, 20 Euler steps, and the decoder) for each thread count, interleaved (``manifold_fm.timing``: one
warm-up round, then the median of ``--reps`` rounds; CPU and wall time). It also checks that the samples are the
same bytes whatever the thread count.

    python benchmarks/bench_threads.py                              # writes benchmarks/results/threads.{json,md}
    python benchmarks/bench_threads.py --quick --out /tmp/bench     # tiny: 8 samples, 2 solver steps, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from manifold_fm.atomic import write_text_atomic
from manifold_fm.config import validate
from manifold_fm.eval.image_io import to_uint8
from manifold_fm.sampler import SamplerSpec
from manifold_fm.threads import DEFAULT_THREADS, threads_text, using_threads
from manifold_fm.timing import timed
from manifold_fm.training.image import train_image
from manifold_fm.training.runs import load_run, sample_run

from reporting import add_output_options, command, output_dir, written_by


def measure(threads: list[int], batch: int, solver_steps: int | None, reps: int, work: Path) -> dict:
    """Train the tiny run into ``work`` and time one ``sample`` batch of ``batch`` per thread count."""
    run_dir = work / "run"
    with using_threads(1):  # the run's training is not what is measured
        train_image(
            "image-builtin",
            ["train.steps=2", "data.per_class=2", "train.batch_size=8", "train.sample_every=null"],
            run_dir,
            progress=False,
        )
    run = load_run(run_dir)
    sampler = run.cfg.sample.model_dump(include=set(SamplerSpec.model_fields))
    spec = validate(SamplerSpec, {**sampler, **({"steps": solver_steps} if solver_steps else {})})
    images: dict[int, np.ndarray] = {}

    def batch_on(n: int) -> object:
        def sample() -> None:
            with using_threads(n):
                _, _, x = sample_run(run, batch, spec, batch_size=batch, progress=False)
            images[n] = to_uint8(x)

        return sample

    fns = {threads_text(n): batch_on(n) for n in threads}
    times = timed(fns, reps)
    first = images[threads[0]]
    return {
        "threads": threads,
        "batch": batch,
        "sampler": f"{spec.method} x {spec.steps}",
        "model": run.cfg.model.arch,
        "latent_shape": list(run.latent_shape),
        "reps": reps,
        "seconds_per_batch": {name: {"cpu": t.cpu_s, "wall": t.wall_s} for name, t in times.items()},
        "wall_samples_s": {name: list(t.wall) for name, t in times.items()},
        "identical_samples": all(np.array_equal(first, images[n]) for n in threads),
    }


def to_markdown(res: dict) -> str:
    """The report: seconds per batch per thread count, the ratio to one thread, and what was measured."""
    base = res["seconds_per_batch"][threads_text(res["threads"][0])]
    lines = [
        f"# Threads: `manifold-fm sample` seconds per batch ({res['date']})",
        "",
        f"Machine: {res['machine']}, torch {res['torch']}, load average {res['load_avg']:.1f} at the start. "
        f"One batch of {res['batch']} samples of a tiny `image-builtin` run ({res['model']}, latents "
        f"{tuple(res['latent_shape'])}, {res['sampler']}, decoded), as `manifold-fm sample` draws it; median of "
        f"{res['reps']} interleaved round(s) after a warm-up. {written_by()}",
        "",
        f"| torch threads | wall s / batch | CPU s / batch | wall time vs {threads_text(res['threads'][0])} |",
        "|---|---|---|---|",
    ]
    for n in res["threads"]:
        t = res["seconds_per_batch"][threads_text(n)]
        lines.append(f"| {n} | {t['wall']:.2f} | {t['cpu']:.2f} | {t['wall'] / base['wall']:.1f}x |")
    same = "the same bytes" if res["identical_samples"] else "NOT the same bytes"
    lines += [
        "",
        f"The samples are {same} at every thread count. The default of every compute command without `--threads` "
        f"is `manifold_fm.threads.DEFAULT_THREADS` = {res['default_threads']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to time (default 1 2)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 3; --quick: 1)")
    add_output_options(parser)
    args = parser.parse_args()
    out = output_dir(parser, args)
    batch, solver_steps, reps = (8, 2, args.reps or 1) if args.quick else (64, None, args.reps or 3)
    with tempfile.TemporaryDirectory(prefix="manifold-fm-bench-threads-") as work:
        res = {
            "command": command(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
            "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
            "torch": torch.__version__,
            "default_threads": DEFAULT_THREADS,
            **measure(args.threads, batch, solver_steps, reps, Path(work)),
        }
    md = to_markdown(res)
    write_text_atomic(out / "threads.json", json.dumps(res, indent=2) + "\n")
    write_text_atomic(out / "threads.md", md)
    print(md)


if __name__ == "__main__":
    main()
