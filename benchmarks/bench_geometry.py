"""Geometry speed: TokenSpheres geodesic vs its linear-interpolation target, and exp/log/dist vs geoopt's Sphere.

All timings in one run, interleaved (every repetition times every operation once, in turn), reported as the median
over repetitions of both CPU time of this process (``time.process_time``, robust to other jobs on the machine) and
wall time (``manifold_fm/timing.py``, after one warm-up round). Ratios compare medians measured in the same run.
The default shapes, thread count and linear interpolation are ``manifold-fm demo``'s (``manifold_fm/commands/demo.py``),
which times the geodesic against the linear interpolation alone: there both reuse warm memory, while here most calls
get fresh memory from the OS among the 12 interleaved operations, whose page faults dominate the linear
interpolation's time, so the demo's ratio is larger (see its note).

- ``geodesic`` : ``TokenSpheres(C).geodesic(x0, x1, t)`` on a ``(B, C, H, W)`` float32 latent batch (x_t and u_t),
  against ``x_t = x0 + t (x1 - x0), u = x1 - x0`` on the same tensors.
- ``expmap / logmap / dist`` : ours on the latent layout and, like for like, ``Sphere(1)`` on the same tokens-last
  unit-norm tensors that geoopt's (unit) ``Sphere`` gets: ``(B*H*W, C)``.
- geoopt has no closed-form geodesic with velocity; its row uses ``v = log(x0, x1), x_t = exp(x0, t v),
  u_t = log(x_t, x1) / (1 - t)``.

The whole measurement is repeated ``--runs`` times in the same process (default 5); the report keeps every run's
table and ratios, so a range quoted from it is the range of the runs in that file.

    python benchmarks/bench_geometry.py --compile       # writes benchmarks/results/geometry.{json,md} (as committed)
    python benchmarks/bench_geometry.py                 # without the opt-in torch.compile'd geodesic (slow to build)
    python benchmarks/bench_geometry.py --quick --out /tmp/bench   # tiny tensors, 2 runs of 3 repetitions
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from datetime import datetime, timezone

import torch
from torch import Tensor

from manifold_fm.atomic import write_text_atomic
from manifold_fm.commands.demo import (
    TIMING_BATCH,
    TIMING_CHANNELS,
    TIMING_REPS,
    TIMING_SIZE,
    TIMING_THREADS,
    lerp_target,
)
from manifold_fm.manifolds import Sphere, TokenSpheres
from manifold_fm.timing import timed

from reporting import add_output_options, command, output_dir, written_by


def run(batch: int, channels: int, size: int, reps: int, compile_: bool) -> dict:
    """One run: every operation timed over ``reps`` interleaved repetitions; medians (ms) and ratios."""
    import geoopt

    g = torch.Generator().manual_seed(0)
    shape = (batch, channels, size, size)
    ts = TokenSpheres(channels, axis=1)
    R = ts.radius
    x0 = ts.random_base(shape, generator=g)
    x1 = ts.random_base(shape, generator=g)
    t = torch.rand(batch, generator=g) * 0.98  # away from t = 1 for geoopt's log(x_t, x1) / (1 - t)
    u = ts.proju(x0, torch.randn(shape, generator=g)) * 0.5

    # tokens-last, unit-norm copies for geoopt (and our Sphere(1) on the very same tensors)
    def tok(z: Tensor) -> Tensor:
        return (z.movedim(1, -1) / R).reshape(-1, channels).contiguous()

    a0, a1, au = tok(x0), tok(x1), tok(u)
    tt = t.repeat_interleave(size * size).unsqueeze(-1)
    gs = geoopt.Sphere()
    unit = Sphere(1.0)

    def geoopt_geodesic() -> tuple[Tensor, Tensor]:
        v = gs.logmap(a0, a1)
        xt = gs.expmap(a0, tt * v)
        return xt, gs.logmap(xt, a1) / (1 - tt)

    fns: dict[str, Callable[[], object]] = {
        "lerp target": lambda: lerp_target(x0, x1, t),  # what `manifold-fm demo` times too
        "geodesic (ours, latent layout)": lambda: ts.geodesic(x0, x1, t),
        "geodesic (ours, tokens-last)": lambda: unit.geodesic(a0, a1, tt),
        "geodesic (geoopt log/exp/log)": geoopt_geodesic,
        "expmap (ours, latent layout)": lambda: ts.expmap(x0, u),
        "expmap (ours, tokens-last)": lambda: unit.expmap(a0, au),
        "expmap (geoopt)": lambda: gs.expmap(a0, au),
        "logmap (ours, latent layout)": lambda: ts.logmap(x0, x1),
        "logmap (ours, tokens-last)": lambda: unit.logmap(a0, a1),
        "logmap (geoopt)": lambda: gs.logmap(a0, a1),
        "dist (ours, tokens-last)": lambda: unit.dist(a0, a1),
        "dist (geoopt)": lambda: gs.dist(a0, a1),
    }
    compile_s = None
    if compile_:
        tc = TokenSpheres(channels, axis=1, compile=True)
        compile_s = timed({"build": lambda: tc.geodesic(x0, x1, t)}, 1, warmup=0)["build"].wall_s
        fns["geodesic (ours, torch.compile)"] = lambda: tc.geodesic(x0, x1, t)
    with torch.no_grad():
        times = {k: tm.medians("cpu", "wall") for k, tm in timed(fns, reps).items()}

    def ratio(a: str, b: str) -> dict[str, float]:
        return {k: times[a][k] / times[b][k] for k in ("cpu", "wall")}

    ratios = {
        "geodesic / lerp target": ratio("geodesic (ours, latent layout)", "lerp target"),
        "geodesic tokens-last / lerp target": ratio("geodesic (ours, tokens-last)", "lerp target"),
        "geodesic ours / geoopt": ratio("geodesic (ours, tokens-last)", "geodesic (geoopt log/exp/log)"),
        "expmap ours / geoopt": ratio("expmap (ours, tokens-last)", "expmap (geoopt)"),
        "logmap ours / geoopt": ratio("logmap (ours, tokens-last)", "logmap (geoopt)"),
        "dist ours / geoopt": ratio("dist (ours, tokens-last)", "dist (geoopt)"),
    }
    if compile_:
        ratios["compiled geodesic / lerp target"] = ratio("geodesic (ours, torch.compile)", "lerp target")
    return {
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "compile_seconds": compile_s,
        "times_ms": {k: {m: 1e3 * v for m, v in d.items()} for k, d in times.items()},
        "ratios": ratios,
    }


def to_markdown(res: dict) -> str:
    runs = res["runs"]
    n = len(runs)
    loads = [r["load_avg"] for r in runs if r["load_avg"] is not None]
    span = (
        f"{min(loads):.1f}-{max(loads):.1f}"
        if loads and min(loads) < max(loads)
        else f"{loads[0]:.1f}"
        if loads
        else ""
    )
    load = f"load average {span} at the runs' starts" if loads else "load unknown"
    lines = [
        f"# Geometry benchmark ({res['date']})",
        "",
        f"Machine: {res['machine']}, torch {res['torch']}, {res['threads']} thread(s), {load}; float32 batch "
        f"{tuple(res['shape'])}; {n} run(s) in one process, each the median of {res['reps']} interleaved "
        f"repetitions. {written_by()}",
        "",
        "Ratios of medians, per run (CPU time / wall time):",
        "",
        "| ratio | " + " | ".join(f"run {i + 1}" for i in range(n)) + " |",
        "|---" * (n + 1) + "|",
    ]
    for name in runs[0]["ratios"]:
        cells = [f"{r['ratios'][name]['cpu']:.2f} / {r['ratios'][name]['wall']:.2f}" for r in runs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Milliseconds per call, per run (CPU time / wall time):",
        "",
        "| operation | " + " | ".join(f"run {i + 1}" for i in range(n)) + " |",
        "|---" * (n + 1) + "|",
    ]
    for name in runs[0]["times_ms"]:
        cells = [f"{r['times_ms'][name]['cpu']:.2f} / {r['times_ms'][name]['wall']:.2f}" for r in runs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    builds = [r["compile_seconds"] for r in runs if r["compile_seconds"] is not None]
    if builds:
        lines += ["", "torch.compile build time (first call), per run: " + ", ".join(f"{b:.0f} s" for b in builds)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="default 256 (--quick: 4)")
    parser.add_argument("--channels", type=int, default=None, help="default 32 (--quick: 8)")
    parser.add_argument("--size", type=int, default=None, help="default 16 (--quick: 4)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per run (default 21; --quick: 3)")
    parser.add_argument("--runs", type=int, default=None, help="runs of the whole measurement (default 5; --quick: 2)")
    parser.add_argument(
        "--threads", type=int, default=TIMING_THREADS, help="torch threads (1: least disturbed by other jobs)"
    )
    parser.add_argument("--compile", action="store_true", help="also time the opt-in torch.compile'd geodesic")
    add_output_options(parser)
    args = parser.parse_args()
    out = output_dir(parser, args)
    q = args.quick
    batch, channels, size = (
        args.batch or (4 if q else TIMING_BATCH),
        args.channels or (8 if q else TIMING_CHANNELS),
        args.size or (4 if q else TIMING_SIZE),
    )
    reps, n_runs = args.reps or (3 if q else TIMING_REPS), args.runs or (2 if q else 5)
    torch.set_num_threads(args.threads)
    res = {
        "command": command(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "torch": torch.__version__,
        "threads": args.threads,
        "shape": [batch, channels, size, size],
        "reps": reps,
        "runs": [],
    }
    for i in range(n_runs):
        res["runs"].append(run(batch, channels, size, reps, args.compile))
        print(f"run {i + 1}/{n_runs}: geodesic / lerp target {res['runs'][-1]['ratios']['geodesic / lerp target']}")
    md = to_markdown(res)
    write_text_atomic(out / "geometry.json", json.dumps(res, indent=2) + "\n")
    write_text_atomic(out / "geometry.md", md)
    print(md)


if __name__ == "__main__":
    main()
