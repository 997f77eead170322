"""The built-in default run as the README shows it: ``manifold-fm train`` with no arguments, timed, its table and its
pictures copied into ``benchmarks/results/``.

The run is exactly the first command of the README (the shipped ``default`` config: built-in tokenizer, decoder
finetune, the spherical and linear arms trained in parallel processes, sampled and scored), into ``--work``; the
wall time covers the whole run (imports excluded), and the machine's load average at its start and end is recorded
with it, because a busy machine stretches it. Seeds beyond the first come from the ablation benchmark
(``benchmarks/ablation.py``: the same config and seeds with all four arms; its linear and spherical arms are these
arms), so this script runs one seed.

    python benchmarks/default_run.py                # -> results/default_run.{json,md} and the pictures
    python benchmarks/default_run.py --report       # rebuild the Markdown from the saved JSON

Writes ``default_run.json`` (the run's ``results.json`` with the wall time, load and machine), ``default_run.md``
(the table the run prints, and the conditions), ``default_run_spherical.png`` / ``default_run_linear.png`` (the
arms' labelled sample grids), ``default_run_reconstructions.png`` and ``default_run_metrics.png`` (metrics over
training steps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from manifold_fm.atomic import write_json_atomic, write_text_atomic

from reporting import RESULTS, command, written_by

PICTURES = {
    "spherical/grid.png": "default_run_spherical.png",
    "linear/grid.png": "default_run_linear.png",
    "reconstructions.png": "default_run_reconstructions.png",
    "metrics_over_steps.png": "default_run_metrics.png",
}


def run(work: Path) -> dict:
    """The default run into ``work`` (replaced if it exists); its results with the wall time and conditions."""
    from manifold_fm.training.default_run import run_default

    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    run_default(None, [], work, progress=False, overwrite=work.exists())
    wall = time.perf_counter() - t0
    results = json.loads((work / "results.json").read_text())
    return {
        "command": command(),
        "run": "manifold-fm train (the default config, no overrides)",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "wall_s": round(wall, 1),
        "load_avg_start": round(load_start, 2),
        "load_avg_end": round(os.getloadavg()[0], 2),
        "results": results,
        "table": (work / "results.md").read_text(),
    }


def report(data: dict) -> str:
    """The Markdown report: the run's own table, then when and how it ran."""
    return "\n".join(
        [
            data["table"].rstrip(),
            "",
            f"Run {data['date']} on {data['machine']}: {data['wall_s']:.0f} s wall for the whole run (load average "
            f"{data['load_avg_start']:.1f} at its start, {data['load_avg_end']:.1f} at its end; other jobs on the "
            f"machine lengthen it). {data['run']}. {written_by(data['command'])}",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/default-benchmark"), help="the run's folder (replaced)")
    parser.add_argument("--report", action="store_true", help="only rebuild the Markdown from the saved JSON")
    args = parser.parse_args()
    path = RESULTS / "default_run.json"
    if args.report:
        data = json.loads(path.read_text())
    else:
        data = run(args.work)
        write_json_atomic(path, data)
        for src, dst in PICTURES.items():
            shutil.copyfile(args.work / src, RESULTS / dst)
    write_text_atomic(RESULTS / "default_run.md", report(data))
    print(report(data))


if __name__ == "__main__":
    main()
