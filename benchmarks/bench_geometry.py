"""Geometry speed: TokenSpheres geodesic vs its linear-interpolation target, and exp/log/dist vs geoopt's Sphere.

All timings in one run, interleaved (every repetition times every operation once, in turn), reported as the median
over repetitions of both CPU time of this process (``time.process_time``, robust to other jobs on the machine) and
wall time (``benchmarks/timing.py``, after one warm-up round). Ratios compare medians measured in the same run.

- ``geodesic`` : ``TokenSpheres(C).geodesic(x0, x1, t)`` on a ``(B, C, H, W)`` float32 latent batch (x_t and u_t),
  against ``x_t = x0 + t (x1 - x0), u = x1 - x0`` on the same tensors.
- ``expmap / logmap / dist`` : ours on the latent layout and, like for like, ``Sphere(1)`` on the same tokens-last
  unit-norm tensors that geoopt's (unit) ``Sphere`` gets: ``(B*H*W, C)``.
- geoopt has no closed-form geodesic with velocity; its row uses ``v = log(x0, x1), x_t = exp(x0, t v),
  u_t = log(x_t, x1) / (1 - t)``.

    python benchmarks/bench_geometry.py                 # writes benchmarks/results/geometry.{json,md}
    python benchmarks/bench_geometry.py --compile       # adds the opt-in torch.compile'd geodesic (slow to build)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor

from manifold_fm.atomic import write_text_atomic
from manifold_fm.manifolds import Sphere, TokenSpheres

from timing import timed


def run(batch: int, channels: int, size: int, reps: int, threads: int, compile_: bool) -> dict:
    import geoopt

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    shape = (batch, channels, size, size)
    ts = TokenSpheres(channels, axis=1)
    R = ts.radius
    x0 = ts.random_base(shape, generator=g)
    x1 = ts.random_base(shape, generator=g)
    t = torch.rand(batch, generator=g) * 0.98  # away from t = 1 for geoopt's log(x_t, x1) / (1 - t)
    u = ts.proju(x0, torch.randn(shape, generator=g)) * 0.5
    t4 = t.view(-1, 1, 1, 1)

    # tokens-last, unit-norm copies for geoopt (and our Sphere(1) on the very same tensors)
    def tok(z: Tensor) -> Tensor:
        return (z.movedim(1, -1) / R).reshape(-1, channels).contiguous()

    a0, a1, au = tok(x0), tok(x1), tok(u)
    tt = t.repeat_interleave(size * size).unsqueeze(-1)
    gs = geoopt.Sphere()
    unit = Sphere(1.0)

    def lerp() -> tuple[Tensor, Tensor]:
        d = x1 - x0
        return x0 + t4 * d, d

    def geoopt_geodesic() -> tuple[Tensor, Tensor]:
        v = gs.logmap(a0, a1)
        xt = gs.expmap(a0, tt * v)
        return xt, gs.logmap(xt, a1) / (1 - tt)

    fns: dict[str, Callable[[], object]] = {
        "lerp target": lerp,
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
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "threads": threads,
        "shape": list(shape),
        "reps": reps,
        "compile_seconds": compile_s,
        "times_ms": {k: {m: 1e3 * v for m, v in d.items()} for k, d in times.items()},
        "ratios": ratios,
    }


def to_markdown(res: dict) -> str:
    lines = [
        f"# Geometry benchmark ({res['date']})",
        "",
        f"Machine: {res['machine']}, torch {res['torch']}, {res['threads']} thread(s), load average "
        f"{res['load_avg']:.1f} at the start; float32 batch {tuple(res['shape'])}; median of {res['reps']} "
        "interleaved repetitions. Generated by `benchmarks/bench_geometry.py`.",
        "",
        "| operation | CPU ms | wall ms |",
        "|---|---|---|",
    ]
    for name, d in res["times_ms"].items():
        lines.append(f"| {name} | {d['cpu']:.2f} | {d['wall']:.2f} |")
    lines += ["", "| ratio | CPU time | wall time |", "|---|---|---|"]
    for name, d in res["ratios"].items():
        lines.append(f"| {name} | {d['cpu']:.2f}x | {d['wall']:.2f}x |")
    if res["compile_seconds"] is not None:
        lines += ["", f"torch.compile build time: {res['compile_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by other jobs)")
    parser.add_argument("--compile", action="store_true", help="also time the opt-in torch.compile'd geodesic")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    res = run(args.batch, args.channels, args.size, args.reps, args.threads, args.compile)
    md = to_markdown(res)
    write_text_atomic(args.out / "geometry.json", json.dumps(res, indent=2) + "\n")
    write_text_atomic(args.out / "geometry.md", md)
    print(md)


if __name__ == "__main__":
    main()
