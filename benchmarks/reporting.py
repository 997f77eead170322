"""What every benchmark script shares about its output: the ``--quick`` / ``--out`` options, the folder a run writes
to, and the command line its reports state.

A full run writes to ``benchmarks/results/`` (the committed results the READMEs and docs quote). ``--quick`` (tiny
sizes, few repetitions: a smoke run) writes to ``--out`` or, without it, to a new temporary folder: a quick run never
overwrites the committed results. Every report names the command that wrote it (:func:`written_by`), and every JSON
report stores it under ``"command"``.

The scripts run as ``python benchmarks/<script>.py`` (or through ``python -m benchmarks``), so this file is
importable as ``reporting`` from them, like ``timing``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: Study -> offset added to a trained model's seed for the noise of the samples the study draws. One table so that
#: the studies' noise stays disjoint from each other's and from training's and the runs' own evaluations (seed + a
#: few): ``sampling.py`` reports on ``report`` and chooses its presets on ``select``.
NOISE_OFFSETS = {"report": 10_000, "select": 20_000, "precision": 30_000, "decoder_swap": 40_000}


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--quick`` and ``--out`` with the same meaning in every script."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, few repetitions (a smoke run, seconds); writes to --out or a new temporary folder, "
        "never to benchmarks/results/",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the reports (default: benchmarks/results/; with --quick: a new temporary folder)",
    )


def output_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The folder this run writes to (see the module docstring); a quick run aimed at the committed results is
    refused."""
    if args.out is None:
        if not args.quick:
            return RESULTS
        out = Path(tempfile.mkdtemp(prefix="manifold-fm-bench-quick-"))
        print(f"--quick without --out: writing to {out}", flush=True)
        return out
    if args.quick and args.out.resolve() == RESULTS:
        parser.error("--quick must not write to benchmarks/results/ (the committed full results): pick another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    return args.out


def command() -> str:
    """The command line that is running, as ``python benchmarks/<script>.py <arguments>``."""
    return " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *map(shlex.quote, sys.argv[1:])])


def written_by(cmd: str | None = None) -> str:
    """The sentence every Markdown report carries: ``cmd`` (a report rebuilt from its JSON passes the stored
    ``"command"``) or the running :func:`command`."""
    return f"Written by `{cmd or command()}`."


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of per-seed figures."""
    import statistics

    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def map_in_processes(script: str, function: str, jobs: list, processes: int) -> list:
    """``[function(job) for job in jobs]`` in ``processes`` spawned processes (one job each at a time), where
    ``function`` is a top-level function of ``benchmarks/<script>.py``. It is looked up in that file imported by its
    module name (this folder is on ``sys.path`` for the scripts), so the spawned processes find it also when the
    script runs as another program's ``__main__`` (``python -m benchmarks`` runs the scripts in its own process)."""
    import importlib
    import multiprocessing as mp

    worker = getattr(importlib.import_module(Path(script).stem), function)
    with mp.get_context("spawn").Pool(processes) as pool:
        return pool.map(worker, jobs, chunksize=1)


__all__ = [
    "NOISE_OFFSETS",
    "RESULTS",
    "add_output_options",
    "command",
    "map_in_processes",
    "mean_sd",
    "output_dir",
    "written_by",
]
