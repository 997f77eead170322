"""Engine speed: a training step with GeodesicPath vs LinearPath on token spheres, and sampling cost per solver at
matched accuracy.

All timings in one run, interleaved, reported as the median over repetitions of this process's CPU time
(``time.process_time``: robust to other jobs on a shared machine) and wall time, after one warm-up round
(``manifold_fm/timing.py``); ratios compare medians from the same run.

1. ``train_step``: ``path.sample`` + the same MLP forward + :func:`flow_matching_loss` + backward + AdamW step on a
   ``(B, C, H, W)`` float32 latent batch on ``TokenSpheres(C)``; GeodesicPath (slerp, tangent-projected loss) vs
   LinearPath (plain MSE). Also the path sampling alone.
2. ``sampling``: a nonlinear time-dependent field on token spheres (float64); the reference solution is RK4 with
   2048 steps. For each method the smallest step count from 2, 4, 8, ... (adaptive: the loosest tolerance from
   1e-2, 1e-3, ...) whose maximum geodesic error is below the target; reported with its network evaluations (NFE)
   and time. RK4 is also shown with the cheaper stage transports (``parallel``, ``project``).
3. ``flow_matching`` (only if the ``flow-matching`` package is importable): facebookresearch/flow_matching's
   ``GeodesicProbPath`` sampling and ``RiemannianODESolver`` (error vs the same reference and CPU time at equal
   step counts) next to ours with the default ``dlog`` chart stepper and with ``transport="ambient"``.

    python benchmarks/bench_engine.py            # writes benchmarks/results/engine.{json,md}
    python benchmarks/bench_engine.py --quick --out /tmp/bench   # tiny sizes, a loose target (a smoke run, seconds)

The committed report was written with flow_matching importable from a private ``PYTHONPATH`` (it is not a
dependency of this project; the report names the version it found):

    pip install --no-deps --target /tmp/fm flow_matching==1.0.10
    PYTHONPATH=/tmp/fm python benchmarks/bench_engine.py
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
from collections.abc import Callable
from datetime import datetime, timezone

import torch
from torch import Tensor, nn

from manifold_fm.atomic import write_text_atomic
from manifold_fm.loss import flow_matching_loss
from manifold_fm.manifolds import TokenSpheres
from manifold_fm.paths import GeodesicPath, LinearPath
from manifold_fm.solvers import IntegrationStats, adaptive_methods, integrate
from manifold_fm.timing import timed

from reporting import add_output_options, command, output_dir, written_by


class FlatMLP(nn.Module):
    """The same network for both paths: an MLP on the flattened latent plus a time input."""

    def __init__(self, n: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, n)
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        return self.net(torch.cat([flat, t[:, None]], dim=1)).reshape(x.shape)


def bench_train_step(batch: int, channels: int, size: int, hidden: int, reps: int) -> dict[str, object]:
    m = TokenSpheres(channels, axis=1)
    g = torch.Generator().manual_seed(0)
    shape = (batch, channels, size, size)
    x0, x1 = m.random_base(shape, g), m.random_base(shape, g)
    t = torch.rand(batch, generator=g)
    model = FlatMLP(channels * size * size, hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    geo, lin = GeodesicPath(m), LinearPath()

    def step(path: GeodesicPath | LinearPath) -> Callable[[], None]:
        def run() -> None:
            s = path.sample(x0, x1, t)
            loss = flow_matching_loss(path.manifold, model(s.x_t, s.t), s)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    fns = {
        "geodesic_step": step(geo),
        "linear_step": step(lin),
        "geodesic_path": lambda: geo.sample(x0, x1, t),
        "linear_path": lambda: lin.sample(x0, x1, t),
    }
    res = {k: tm.medians() for k, tm in timed(fns, reps).items()}
    return {
        "shape": list(shape),
        "hidden": hidden,
        "timings": res,
        "step_ratio_cpu": res["geodesic_step"]["cpu_s"] / res["linear_step"]["cpu_s"],
        "path_ratio_cpu": res["geodesic_path"]["cpu_s"] / res["linear_path"]["cpu_s"],
    }


def sampling_field(x: Tensor, t: Tensor) -> Tensor:
    """A smooth nonlinear, time-dependent ambient field (projected by the solver)."""
    return torch.sin(x.roll(1, dims=1)) * (1 + t.view(-1, 1, 1, 1)) + 0.3 * torch.cos(x.roll(1, dims=2))


def max_geodesic_error(m: TokenSpheres, x: Tensor, ref: Tensor) -> float:
    return float(m.radius * m.angle(x, ref).max())


def bench_sampling(
    batch: int,
    channels: int,
    size: int,
    targets: list[float],
    ref_steps: int = 2048,
    max_steps: int = 4096,
    reps: int = 3,
) -> dict[str, object]:
    m = TokenSpheres(channels, axis=1)
    x0 = m.random_base((batch, channels, size, size), torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = integrate(sampling_field, x0, m, steps=ref_steps, method="rk4")
    rows = []
    fixed = [
        ("euler", "dlog"),
        ("heun", "dlog"),
        ("midpoint", "dlog"),
        ("midpoint", "ambient"),
        ("rk4", "dlog"),
        ("rk4", "parallel"),
        ("rk4", "project"),
        ("rk4", "ambient"),
    ]
    for target in targets:
        for method, transport in fixed:
            row: dict[str, object] = {"target": target, "method": method, "transport": transport}
            for steps in [2**k for k in range(1, max_steps.bit_length())]:
                err = max_geodesic_error(
                    m, integrate(sampling_field, x0, m, steps=steps, method=method, transport=transport), ref
                )
                if err <= target:
                    stats = IntegrationStats()
                    run = functools.partial(
                        integrate, sampling_field, x0, m, steps=steps, method=method, transport=transport, stats=stats
                    )
                    row.update(steps=steps, **timed({"s": run}, reps)["s"].medians(), nfe=stats.nfe, error=err)
                    break
            rows.append(row)
        for method in ("dopri5", "bosh3"):
            if method not in adaptive_methods():
                continue
            row = {"target": target, "method": method, "transport": "dlog"}
            for tol in [10.0**-k for k in range(2, 12)]:
                err = max_geodesic_error(
                    m, integrate(sampling_field, x0, m, method=method, steps=4, atol=tol, rtol=tol), ref
                )
                if err <= target:
                    stats = IntegrationStats()
                    run = functools.partial(
                        integrate, sampling_field, x0, m, method=method, steps=4, atol=tol, rtol=tol, stats=stats
                    )
                    row.update(tol=tol, **timed({"s": run}, reps)["s"].medians(), nfe=stats.nfe, error=err)
                    break
            rows.append(row)
    return {"shape": [batch, channels, size, size], "reference_steps": ref_steps, "rows": rows}


def bench_flow_matching(
    batch: int,
    channels: int,
    size: int,
    ref_steps: int = 2048,
    step_counts: tuple[int, ...] = (8, 32, 128),
    reps: int = 3,
) -> dict[str, object] | None:
    """facebookresearch/flow_matching's Riemannian path and solver on the same unit-sphere tokens, if installed:
    path sampling time, and sampler error (vs an RK4 x 2048 reference of ours) and CPU time at equal step counts."""
    try:
        import flow_matching
        from flow_matching.path import GeodesicProbPath
        from flow_matching.path.scheduler import CondOTScheduler
        from flow_matching.solver import RiemannianODESolver
        from flow_matching.utils import ModelWrapper
        from flow_matching.utils.manifolds import Sphere as FMSphere
    except ImportError:
        return None
    m = TokenSpheres(channels, axis=-1, radius=1.0)
    g = torch.Generator().manual_seed(2)
    n = batch * size * size
    x0 = m.random_base((n, channels), g, dtype=torch.float64)
    x1 = m.random_base((n, channels), g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    fm_path = GeodesicProbPath(scheduler=CondOTScheduler(), manifold=FMSphere())
    ours = GeodesicPath(m)
    path_fns = {"ours": lambda: ours.sample(x0, x1, t), "flow_matching": lambda: fm_path.sample(x_0=x0, x_1=x1, t=t)}
    res: dict[str, object] = {
        "version": getattr(flow_matching, "__version__", "unknown"),
        "path": {k: tm.medians() for k, tm in timed(path_fns, 3 * reps).items()},
    }

    def field(x: Tensor, tt: Tensor) -> Tensor:
        tt = tt.reshape(-1).expand(x.shape[0]) if tt.numel() == 1 else tt
        return torch.sin(x.roll(1, dims=-1)) * (1 + tt[:, None]) + 0.3 * torch.cos(x.roll(2, dims=-1))

    class Wrapped(ModelWrapper):
        def forward(self, x: Tensor, t: Tensor, **extras: object) -> Tensor:
            return field(x, t)

    solver = RiemannianODESolver(manifold=FMSphere(), velocity_model=Wrapped(nn.Identity()))
    ref = integrate(field, x0, m, steps=ref_steps, method="rk4")
    rows = []
    for method in ("midpoint", "rk4"):
        for steps in step_counts:
            ours_run = functools.partial(integrate, field, x0, m, steps=steps, method=method)
            amb_run = functools.partial(integrate, field, x0, m, steps=steps, method=method, transport="ambient")
            fm_run = functools.partial(
                solver.sample,
                x0,
                step_size=1.0 / steps,
                method=method,
                time_grid=torch.tensor([0.0, 1.0], dtype=torch.float64),
                projx=True,
                proju=True,
            )
            tm = timed({"ours": ours_run, "ambient": amb_run, "flow_matching": fm_run}, reps)
            rows.append(
                {
                    "method": method,
                    "steps": steps,
                    "ours_error": max_geodesic_error(m, ours_run(), ref),
                    "ambient_error": max_geodesic_error(m, amb_run(), ref),
                    "fm_error": max_geodesic_error(m, fm_run(), ref),
                    "ours_cpu_s": tm["ours"].cpu_s,
                    "ambient_cpu_s": tm["ambient"].cpu_s,
                    "fm_cpu_s": tm["flow_matching"].cpu_s,
                }
            )
    res["sampler"] = rows
    path_t = res["path"]
    res["path_ratio_cpu"] = path_t["flow_matching"]["cpu_s"] / path_t["ours"]["cpu_s"]  # type: ignore[index]
    return {"tokens": n, "dim": channels, **res}


def to_markdown(report: dict[str, object]) -> str:
    lines = [
        f"# Engine benchmark ({report['date']})",
        "",
        f"Machine: {report['machine']}; torch {report['torch']}, {report['threads']} thread(s), load average "
        f"{report['load_avg_start']:.1f} at the start and {report['load_avg_end']:.1f} at the end. Medians of CPU "
        "time of this process; ratios from the same run. "
        f"{written_by()}",
        "",
    ]
    ts = report["train_step"]
    tm = ts["timings"]
    lines += [
        "## Training step on token spheres",
        "",
        f"Latents {tuple(ts['shape'])}, MLP hidden {ts['hidden']}, float32.",
        "",
        "| | geodesic (slerp) | linear | ratio geodesic/linear |",
        "|---|---|---|---|",
        f"| full step (ms) | {tm['geodesic_step']['cpu_s'] * 1e3:.2f} | {tm['linear_step']['cpu_s'] * 1e3:.2f} "
        f"| {ts['step_ratio_cpu']:.2f} |",
        f"| path.sample only (ms) | {tm['geodesic_path']['cpu_s'] * 1e3:.3f} | "
        f"{tm['linear_path']['cpu_s'] * 1e3:.3f} | {ts['path_ratio_cpu']:.2f} |",
        "",
    ]
    sp = report["sampling"]
    lines += [
        "## Sampling cost at matched accuracy",
        "",
        f"Token spheres {tuple(sp['shape'])}, float64; error = max geodesic distance per token to an RK4 "
        f"reference with {sp['reference_steps']} steps.",
        "",
        "| target error | method | transport | steps / tol | NFE | error | CPU ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sp["rows"]:
        if "nfe" not in r:
            lines.append(f"| {r['target']:.0e} | {r['method']} | {r['transport']} | not reached | | | |")
            continue
        knob = str(r["steps"]) if "steps" in r else f"tol {r['tol']:.0e}"
        lines.append(
            f"| {r['target']:.0e} | {r['method']} | {r['transport']} | {knob} | {r['nfe']} | "
            f"{r['error']:.1e} | {r['cpu_s'] * 1e3:.1f} |"
        )
    fm = report.get("flow_matching")
    lines += ["", "## facebookresearch/flow_matching", ""]
    if fm is None:
        lines.append("Not measured: the `flow-matching` package is not installed in this environment.")
    else:
        lines += [
            f"flow_matching {fm['version']} (importable for this run only; not a dependency of manifold-fm). "
            f"{fm['tokens']} tokens on S^{fm['dim'] - 1}, float64. GeodesicProbPath.sample / our "
            f"GeodesicPath.sample CPU time: {fm['path_ratio_cpu']:.2f}x.",
            "",
            "| method | steps | error: ours dlog / ours ambient / flow_matching | CPU ms: dlog / ambient / fm |",
            "|---|---|---|---|",
        ]
        for r in fm["sampler"]:
            lines.append(
                f"| {r['method']} | {r['steps']} | {r['ours_error']:.1e} / {r['ambient_error']:.1e} / "
                f"{r['fm_error']:.1e} | {r['ours_cpu_s'] * 1e3:.1f} / {r['ambient_cpu_s'] * 1e3:.1f} / "
                f"{r['fm_cpu_s'] * 1e3:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    add_output_options(parser)
    args = parser.parse_args()
    out = output_dir(parser, args)
    torch.set_num_threads(args.threads)
    q = args.quick
    report: dict[str, object] = {
        "command": command(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores)".strip(),
        "torch": torch.__version__,
        "threads": args.threads,
        "load_avg_start": os.getloadavg()[0],
    }
    if q:  # tiny tensors, a loose target, a short reference: seconds
        report["train_step"] = bench_train_step(8, 4, 4, 64, 3)
        report["sampling"] = bench_sampling(2, 4, 2, [1e-2], ref_steps=256, max_steps=256, reps=1)
        report["flow_matching"] = bench_flow_matching(1, 4, 4, ref_steps=256, step_counts=(8,), reps=1)
    else:
        report["train_step"] = bench_train_step(128, 4, 16, 1024, 15)
        report["sampling"] = bench_sampling(16, 4, 8, [1e-2, 1e-4, 1e-6])
        report["flow_matching"] = bench_flow_matching(4, 4, 8)
    report["load_avg_end"] = os.getloadavg()[0]
    write_text_atomic(out / "engine.json", json.dumps(report, indent=2))
    md = to_markdown(report)
    write_text_atomic(out / "engine.md", md)
    print(md)


if __name__ == "__main__":
    main()
