"""Run the benchmark scripts by name, or all of them: one command regenerates every CPU result.

    python -m benchmarks all                      # every CPU benchmark, full size -> benchmarks/results/
    python -m benchmarks all --quick --out /tmp/b # every one tiny (a smoke run; CI runs this), never results/
    python -m benchmarks geometry engine          # some of them
    python -m benchmarks all --long               # also the long entries (default-run sweep, ablation: hours)
    python -m benchmarks --list                   # the entries, their scripts and what they write
    python -m benchmarks earth --data DIR         # the earth-science sets on S^2 (CSVs read from DIR)

Each entry runs its script exactly as ``python benchmarks/<script>.py <arguments>`` would (the arguments of the
committed results, or ``--quick``; ``--out`` is passed on), one after the other in this process, so the reports
state the same command line. A failing entry is reported and the others still run; the exit status is 1 if any
failed. Each finished entry's wall time, command, date and load go into ``run_times.{json,md}`` of the output
folder (one row per entry, replaced by its latest run). The long entries (``--long``) train complete default runs,
have no quick mode and always write to ``benchmarks/results/``, so they are never part of ``--quick`` and refuse
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Entry:
    """One benchmark: its script, the arguments of its committed full run (``args``) and of its quick run
    (``quick_args``, besides ``--quick``), and the reports it writes."""

    script: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    long: bool = False
    data: bool = False  # reads a data folder the user provides (``--data DIR``, passed on to the script)


ENTRIES: dict[str, Entry] = {
    "accuracy": Entry("bench_accuracy.py", outputs=("accuracy.json", "accuracy.md")),
    # --compile builds torch.compile graphs (tens of seconds on 2 cores): the full run only
    "geometry": Entry("bench_geometry.py", ("--compile",), outputs=("geometry.json", "geometry.md")),
    "engine": Entry("bench_engine.py", outputs=("engine.json", "engine.md")),
    "training": Entry("bench_training.py", outputs=("training.json", "training.md")),
    "latent_cache": Entry("bench_latent_cache.py", outputs=("latent_cache.json", "latent_cache.md")),
    "compute_budget": Entry("compute_budget.py", outputs=("compute_budget.json", "compute_budget.md")),
    "toy_nll": Entry("toy_nll.py", outputs=("toy_nll.json", "toy_nll.md")),
    "threads": Entry("bench_threads.py", outputs=("threads.json", "threads.md")),
}
ENTRIES["ot_cost"] = Entry("bench_ot.py", outputs=("ot_cost.json", "ot_cost.md"))
# the earth-science sets on S^2 (CSVs read from --data, never downloaded): python -m benchmarks earth --data DIR
ENTRIES["earth"] = Entry(
    "earth.py", ("--minutes", "15", "--work", "runs/earth"), outputs=("earth.json", "earth.md"), long=True, data=True
)
# toy-sphere, -hyperbolic, -spd with both paths over seeds (about 15 min): why the geodesic path trails on them
ENTRIES["geodesic_linear"] = Entry(
    "geodesic_linear.py", outputs=("geodesic_linear.json", "geodesic_linear.md"), long=True
)
# the long entries (--long): complete default runs, and studies of the models they train (hours on 2 cores)
ENTRIES["default_run_sweep"] = Entry(
    "default_run_sweep.py", outputs=("default_run_sweep.json", "default_run_sweep.md"), long=True
)
ENTRIES["ablation"] = Entry(
    "ablation.py",
    ("--work", "runs/ablation", "--set", "sample.cfg_scale=1.0"),
    outputs=("ablation.json", "ablation.md", "ablation.png"),
    long=True,
)
ENTRIES["default_run"] = Entry(
    "default_run.py",
    ("--seeds", "3"),
    outputs=(
        "default_run.json",
        "default_run.md",
        "default_run_spherical.png",
        "default_run_linear.png",
        "default_run_seeds.json",
        "default_run_seeds.md",
    ),
    long=True,
)
# the judge of every FD-builtin-classifier and accuracy: retrains the shipped weights (deterministic for 1 thread)
ENTRIES["builtin_judge"] = Entry("builtin_judge.py", outputs=("builtin_judge.json", "builtin_judge.md"), long=True)
# on the ablation's trained models (runs/ablation, runs/ot): run after `ablation` (and its OT twin below)
ENTRIES["ablation_ot"] = Entry(
    "ablation.py",
    (
        "--work",
        "runs/ot",
        "--arms",
        "linear",
        "spherical",
        "--name",
        "ablation_ot",
        "--set",
        "flow.coupling=ot",
        "--set",
        "sample.cfg_scale=1.0",
    ),
    outputs=("ablation_ot.json", "ablation_ot.md", "ablation_ot.png"),
    long=True,
)
ENTRIES["sampling_nfe"] = Entry(
    "sampling.py",
    ("nfe",),
    outputs=("sampling_nfe.json", "sampling_nfe.md", "sampling_nfe.png", "sampler_presets.json", "sampler_presets.md"),
    long=True,
)
ENTRIES["sampling_guidance"] = Entry(
    "sampling.py",
    ("guidance",),
    outputs=("sampling_guidance.json", "sampling_guidance.md", "sampling_guidance.png"),
    long=True,
)
ENTRIES["sampling_ot"] = Entry("sampling.py", ("ot",), outputs=("sampling_ot.json", "sampling_ot.md"), long=True)
# bf16 against fp32 sampling: on the ablation's models when present, else trains its own (runs/precision)
ENTRIES["sampling_precision"] = Entry(
    "sampling.py", ("precision",), outputs=("sampling_precision.json", "sampling_precision.md"), long=True
)
ENTRIES["decoder_swap"] = Entry("decoder_swap.py", outputs=("decoder_swap.json", "decoder_swap.md"), long=True)
# the default run's decoder finetune on the one trainer against the loop it replaced (whose rows, --label before,
# come from the package at commit c66244f: see the script's docstring)
ENTRIES["finetune_equivalence"] = Entry(
    "finetune_equivalence.py",
    ("--label", "after"),
    outputs=("finetune_equivalence.json", "finetune_equivalence.md"),
    long=True,
)


def _load_text(load: float | None) -> str:
    return "" if load is None else f"{load:.1f}"


def record_time(folder: Path, name: str, command: str, seconds: float, load: float | None) -> None:
    """Put one entry's row into ``run_times.{json,md}`` of ``folder`` (other entries' rows are kept)."""
    from manifold_fm.atomic import write_json_atomic, write_text_atomic

    path = folder / "run_times.json"
    rows: dict = json.loads(path.read_text())["entries"] if path.is_file() else {}
    rows[name] = {
        "command": command,
        "seconds": round(seconds, 1),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_avg_start": load,
    }
    rows = {k: rows[k] for k in [*(n for n in ENTRIES if n in rows), *(n for n in rows if n not in ENTRIES)]}
    write_json_atomic(path, {"entries": rows})
    lines = [
        "| entry | command | wall time | finished | load average at its start |",
        "|---|---|---|---|---|",
        *(
            f"| {k} | `{r['command']}` | {r['seconds']:.0f} s | {r['date']} | {_load_text(r['load_avg_start'])} |"
            for k, r in rows.items()
        ),
        "",
        "Wall time of each entry's latest run, one after the other in one process on the machine of its report. "
        "Written by `python -m benchmarks` (each row by the run of that entry).",
    ]
    write_text_atomic(folder / "run_times.md", "\n".join(lines) + "\n")


def run_entry(name: str, entry: Entry, quick: bool, out: Path | None, data: Path | None = None) -> bool:
    """Run one entry's script in this process as ``python benchmarks/<script> <args>``; True if it succeeded (then
    its wall time goes into ``run_times.{json,md}``)."""
    import torch

    argv = ["--quick", *entry.quick_args] if quick else list(entry.args)
    argv += ["--out", str(out)] if out is not None else []
    argv += ["--data", str(data)] if entry.data and data is not None else []
    script = HERE / entry.script
    command = f"python benchmarks/{entry.script} {' '.join(argv)}".rstrip()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"== {name}: {command}", flush=True)
    saved_argv, saved_path, threads = sys.argv, list(sys.path), torch.get_num_threads()
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(HERE))  # the scripts import their helpers (reporting) as top-level modules
    t0 = time.perf_counter()
    ok = True
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:  # argparse errors, explicit exits
        ok = exc.code in (None, 0)
    except Exception:  # noqa: BLE001 - report it, run the other entries
        traceback.print_exc()
        ok = False
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        torch.set_num_threads(threads)  # each script sets its own; none leaks into the next
    seconds = time.perf_counter() - t0
    print(f"== {name}: {'done' if ok else 'FAILED'} in {seconds:.0f} s", flush=True)
    if ok:
        record_time(out if out is not None else RESULTS, name, command, seconds, load)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("names", nargs="*", help="entries to run ('all': every CPU entry; see --list)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds per entry), never to results/")
    parser.add_argument("--out", type=Path, default=None, help="folder for the reports (default: benchmarks/results/)")
    parser.add_argument("--long", action="store_true", help="with 'all': also the long entries (full runs only)")
    parser.add_argument("--list", action="store_true", help="list the entries and exit")
    parser.add_argument("--data", type=Path, default=None, help="the data folder of the entries that read one (earth)")
    args = parser.parse_args(argv)
    if args.list or not args.names:
        for name, e in ENTRIES.items():
            tag = " [long: --long]" if e.long else ""
            print(f"{name:18s} python benchmarks/{e.script} {' '.join(e.args)}".rstrip() + tag)
            print(f"{'':18s} -> {', '.join(e.outputs)}")
        return 0
    unknown = [n for n in args.names if n != "all" and n not in ENTRIES]
    if unknown:
        parser.error(f"unknown entry {unknown[0]!r}; the entries: all, {', '.join(ENTRIES)}")
    names = [n for n, e in ENTRIES.items() if not e.long or args.long] if "all" in args.names else args.names
    needs_data = [n for n in names if ENTRIES[n].data]
    if needs_data and args.data is None:
        if "all" not in args.names:
            parser.error(f"{needs_data[0]} reads its data from --data DIR (nothing is downloaded)")
        print(f"no --data: skipping {', '.join(needs_data)}", flush=True)
        names = [n for n in names if not ENTRIES[n].data]
    long = [n for n in names if ENTRIES[n].long]
    if long and args.quick:
        if "all" in args.names:
            print(f"--quick: skipping the long entries ({', '.join(long)}): they have no quick mode", flush=True)
            names = [n for n in names if not ENTRIES[n].long]
        else:
            parser.error(f"{long[0]} has no quick mode (it trains complete default runs)")
    if long and args.out is not None:
        parser.error(f"{long[0]} always writes to benchmarks/results/: run it without --out")
    if args.quick and args.out is None:
        import tempfile

        args.out = Path(tempfile.mkdtemp(prefix="manifold-fm-bench-quick-"))
        print(f"--quick without --out: writing to {args.out}", flush=True)
    t0 = time.perf_counter()
    failed = [n for n in names if not run_entry(n, ENTRIES[n], args.quick, args.out, args.data)]
    total = time.perf_counter() - t0
    summary = f"{len(names) - len(failed)} of {len(names)} entries done in {total:.0f} s"
    print(summary + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
