"""``manifold-fm demo``: a few-second tour of the geometry core, printed as two tables.

1. float32 angle accuracy on the sphere: our distance vs acos of the clamped dot product, both against the exact
   angle between the same float32 inputs recomputed in float64.
2. Slerp on ``TokenSpheres`` for a ``(B, 32, 16, 16)`` latent batch: distance of ``x_t`` from the spheres, tangency
   and speed of ``u_t``, and the time against a linear interpolation on the same tensors, measured as
   ``benchmarks/bench_geometry.py`` measures it: the same shapes, thread count, linear interpolation and timer
   (:func:`manifold_fm.timing.timed`; the benchmark's defaults are the constants below). The ratios still differ,
   and the demo prints why: the benchmark interleaves 12 operations, so its calls mostly get fresh memory from the
   OS, and those page faults dominate the linear interpolation (run with glibc keeping freed memory,
   ``MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000``, the benchmark's own ratio is the
   demo's, 4-6x on a 2-core machine, rather than 1.8-2x).
"""

from __future__ import annotations

import math
import textwrap

import click
import torch
from torch import Tensor

from ..manifolds import Sphere, TokenSpheres
from ..manifolds.testing import angle_pairs, exact_angle
from ..threads import threads_option, threads_text, using_threads
from ..timing import timed

ANGLES = [1e-6, 1e-4, 1e-2, 1.0, 3.0, math.pi - 1e-3]

#: The slerp timing's setup, shared with ``benchmarks/bench_geometry.py`` (its defaults): a float32
#: ``(TIMING_BATCH, TIMING_CHANNELS, TIMING_SIZE, TIMING_SIZE)`` latent batch on ``TIMING_THREADS`` torch thread(s),
#: the median of ``TIMING_REPS`` interleaved repetitions after one warm-up round.
TIMING_BATCH, TIMING_CHANNELS, TIMING_SIZE = 256, 32, 16
TIMING_THREADS = 1  # one thread: the least disturbed by other jobs on a shared machine
TIMING_REPS = 21


#: Why the demo's ratio is larger than the one in benchmarks/results/geometry.md for the same setup and timer.
MEMORY_NOTE = (
    "(the setup of benchmarks/bench_geometry.py, whose results show a smaller ratio: it times 12 operations in turn, "
    "so most of its calls also fault in fresh memory from the OS, which dominates the linear interpolation's time; "
    "here both operations reuse warm memory)"
)


def lerp_target(x0: Tensor, x1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The linear interpolation the slerp is timed against: ``x_t = x0 + t (x1 - x0)`` and ``u = x1 - x0`` for a
    ``(B, ...)`` batch and times ``t`` of shape ``(B,)``."""
    d = x1 - x0
    return x0 + t.view(-1, *([1] * (x0.ndim - 1))) * d, d


def accuracy_table(g: torch.Generator, n: int = 500) -> list[tuple[float, float, float]]:
    """``(angle, median relative error ours, median relative error naive acos)`` per angle."""
    sphere = Sphere(1.0)
    rows = []
    for theta in ANGLES:
        x, y = angle_pairs(theta, n, 32, generator=g)
        ref = exact_angle(x, y)
        ours = (sphere.dist(x, y).double() - ref).abs() / ref
        naive = (torch.acos((x * y).sum(-1).clamp(-1, 1)).double() - ref).abs() / ref
        rows.append((theta, float(ours.median()), float(naive.median())))
    return rows


@click.command("demo")
@click.option(
    "--batch",
    type=click.IntRange(1, 4096),
    default=TIMING_BATCH,
    show_default=True,
    help="Latent batch size B (the benchmark's by default).",
)
@click.option(
    "--reps",
    type=click.IntRange(1, 100),
    default=TIMING_REPS,
    show_default=True,
    help="Timing repetitions (interleaved, after one warm-up round).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@threads_option
def demo(batch: int, reps: int, seed: int, threads: int | None) -> None:
    """Print float32 angle accuracy (ours vs naive acos) and TokenSpheres slerp checks/speed."""
    g = torch.Generator().manual_seed(seed)
    click.echo("float32 angle accuracy on S^31 (median relative error vs exact angle of the same inputs)")
    click.echo(f"{'angle (rad)':>12}  {'manifold-fm':>12}  {'acos(dot)':>12}")
    for theta, ours, naive in accuracy_table(g):
        click.echo(f"{theta:>12.4g}  {ours:>12.1e}  {naive:>12.1e}")

    ts = TokenSpheres(TIMING_CHANNELS, axis=1)
    shape = (batch, TIMING_CHANNELS, TIMING_SIZE, TIMING_SIZE)
    x0, x1 = ts.random_base(shape, generator=g), ts.random_base(shape, generator=g)
    t = torch.rand(batch, generator=g)
    # the benchmark's thread count unless --threads says otherwise
    with torch.no_grad(), using_threads(TIMING_THREADS if threads is None else threads) as n_threads:
        x_t, u_t = ts.geodesic(x0, x1, t)
        on_sphere = float((x_t.double().norm(dim=1) / ts.radius - 1).abs().max())
        tangency = float(ts.vector_error(x_t, u_t).max())
        speed = u_t.double().norm(dim=1)
        expected = ts.radius * ts.angle(x0, x1).double().squeeze(1)
        speed_err = float(((speed - expected).abs() / expected).max())
        times = timed({"slerp": lambda: ts.geodesic(x0, x1, t), "lerp": lambda: lerp_target(x0, x1, t)}, reps)
    slerp, lerp = times["slerp"], times["lerp"]
    click.echo("")
    click.echo(
        f"slerp on TokenSpheres({TIMING_CHANNELS}), batch {shape}, float32, {threads_text(n_threads)}, "
        f"median of {reps} interleaved repetitions"
    )
    click.echo(f"{'max | |x_t| - R | / R':>30}  {on_sphere:.1e}")
    click.echo(f"{'max |<u_t, x_t>| / |u_t||x_t|':>30}  {tangency:.1e}")
    click.echo(f"{'max | |u_t| - R w | / R w':>30}  {speed_err:.1e}")
    click.echo(f"{'slerp time (x_t and u_t)':>30}  {slerp.wall_s * 1e3:.1f} ms")
    click.echo(
        f"{'linear interpolation time':>30}  {lerp.wall_s * 1e3:.1f} ms  (ratio {slerp.wall_s / lerp.wall_s:.1f}x "
        f"wall time, {slerp.cpu_s / lerp.cpu_s:.1f}x CPU time)"
    )
    differs = [
        f"batch {TIMING_BATCH}" if batch != TIMING_BATCH else "",
        threads_text(TIMING_THREADS) if n_threads != TIMING_THREADS else "",
    ]
    differs = [d for d in differs if d]
    if differs:
        note = (
            f"(not the setup of benchmarks/bench_geometry.py ({', '.join(differs)}): small batches and extra "
            "threads add fixed costs that change the ratio)"
        )
        click.echo(textwrap.fill(note, 100))
    else:
        click.echo(textwrap.fill(MEMORY_NOTE, 100))
