"""Toy manifolds end to end: every built-in toy config trained with the geodesic path and with the linear baseline,
its test negative log-likelihood against the target's true one, and how long each run took.

Each row is one run of :func:`manifold_fm.training.toy.train_toy` with the config as shipped, i.e. exactly what

    manifold-fm train --config <config> --path <geodesic|linear>

runs (one seed, the config's ``train.seed``), made in this process one after the other. Test NLL: the exact change
of variables along the learned flow (the config's sampler, ``eval.likelihood_steps`` steps) on
``eval.test_samples`` held-out points; true NLL: the target density's own NLL on the same points;
``samples_data_nll``: the target's NLL of the flow's samples (``eval.plot_samples`` of them). Wall times are
``train_seconds`` and ``eval_seconds`` of the run's ``metrics.json``; the runs' folders go to a temporary folder
unless ``--work`` keeps them.

    python benchmarks/toy_nll.py                              # writes benchmarks/results/toy_nll.{json,md}
    python benchmarks/toy_nll.py --only toy-sphere --paths geodesic --out /tmp/bench
    python benchmarks/toy_nll.py --quick --out /tmp/bench     # 10 steps, 16 test points per run (a smoke run)
    python benchmarks/toy_nll.py --report                     # rebuild toy_nll.md from toy_nll.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from manifold_fm.atomic import write_text_atomic
from manifold_fm.training.toy import train_toy

from reporting import add_output_options, command, output_dir, written_by

# config -> its manifold and data, for the table (the JSON has the manifold's repr)
CONFIGS = {
    "toy-sphere": "S^2, vMF mixture",
    "toy-spheres": "(S^2)^3, product-vMF mixture",
    "toy-torus": "T^2, wrapped normals",
    "toy-hyperbolic": "Poincaré disk (geoopt), wrapped normals",
    "toy-spd": "2x2 SPD (geoopt), wrapped normals",
}
PATHS = ("geodesic", "linear")
# --quick: every config and path, tiny (the numbers mean nothing; the code path is the real one)
QUICK = [
    "train.steps=10",
    "train.checkpoint_every=10",
    "train.log_every=5",
    "optim.warmup_steps=2",
    "eval.test_samples=16",
    "eval.plot_samples=16",
    "eval.likelihood_steps=2",
    "sample.steps=4",
]


def run_one(config: str, path: str, work: Path, overrides: list[str]) -> dict:
    """One toy run; its ``metrics.json`` plus the wall time of the whole call."""
    t0 = time.perf_counter()
    out = train_toy(config, [f"flow.path={path}", *overrides], work / f"{config}-{path}", progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"config": config, "path": path, "wall_seconds": round(time.perf_counter() - t0, 2), **metrics}


def to_markdown(res: dict) -> str:
    lines = [
        f"Machine: {res['machine']}, torch {res['torch']}, {res['threads']} thread(s); {res['date']}; "
        f"load average {res['load_avg_start']:.1f} "
        f"at the start and {res['load_avg_end']:.1f} at the end; the runs one after the other, "
        f"{res['total_seconds']:.0f} s in all. {written_by(res['command'])}",
        "",
        "Each row is `manifold-fm train --config <config> --path <path>` with the config as shipped (one seed"
        + (f"; overrides: `{' '.join(res['overrides'])}`" if res["overrides"] else "")
        + "). Test NLL ± its standard error on held-out points; true NLL: the target's own NLL on the same points; "
        "samples' data NLL: the target's NLL of the flow's samples; on-manifold error: the samples' largest "
        "distance off the manifold; train / eval / run: wall seconds of the training, of the evaluation and of the "
        "whole run.",
        "",
        "| config | manifold, data | path | test NLL | true NLL | gap | samples' data NLL | on-manifold error "
        "| train s | eval s | run s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        lines.append(
            f"| {r['config']} | {CONFIGS[r['config']]} | {r['path']} | "
            f"{r['test_nll']:.3f} ± {r['test_nll_stderr']:.3f} | "
            f"{r['true_nll']:.3f} | {r['nll_gap']:+.3f} | {r['samples_data_nll']:.3f} | "
            f"{r['on_manifold_error']:.1e} | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} | "
            f"{r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="configs to run")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--work", type=Path, default=None, help="keep the run folders here (default: discarded)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (training follows train.threads: 1)")
    parser.add_argument("--report", action="store_true", help="only rebuild toy_nll.md from the saved toy_nll.json")
    add_output_options(parser)
    args = parser.parse_args()
    out = output_dir(parser, args)
    if args.report:
        write_text_atomic(out / "toy_nll.md", to_markdown(json.loads((out / "toy_nll.json").read_text())))
        return
    overrides = QUICK if args.quick else []
    torch.set_num_threads(args.threads)
    res: dict = {
        "command": command(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": args.threads,
        "load_avg_start": os.getloadavg()[0],
        "overrides": overrides,
        "runs": [],
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for config in args.only:
            for path in args.paths:
                row = run_one(config, path, work, overrides)
                res["runs"].append(row)
                print(
                    f"{config} {path}: test NLL {row['test_nll']:.3f} (true {row['true_nll']:.3f}), "
                    f"{row['wall_seconds']:.0f} s",
                    flush=True,
                )
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    res["load_avg_end"] = os.getloadavg()[0]
    md = to_markdown(res)
    write_text_atomic(out / "toy_nll.json", json.dumps(res, indent=2) + "\n")
    write_text_atomic(out / "toy_nll.md", md)
    print(md)


if __name__ == "__main__":
    main()
