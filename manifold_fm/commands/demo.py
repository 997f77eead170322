"""``manifold-fm demo``: a few-second tour of the geometry core, printed as two tables.

1. float32 angle accuracy on the sphere: our distance vs acos of the clamped dot product, both against the exact
   angle between the same float32 inputs recomputed in float64.
2. Slerp on ``TokenSpheres`` for a ``(B, 32, 16, 16)`` latent batch: distance of ``x_t`` from the spheres, tangency
   and speed of ``u_t``, and the time against a linear interpolation on the same tensors.
"""

from __future__ import annotations

import math
import statistics
import time

import click
import torch

from ..manifolds import Sphere, TokenSpheres
from ..manifolds.testing import angle_pairs, exact_angle

ANGLES = [1e-6, 1e-4, 1e-2, 1.0, 3.0, math.pi - 1e-3]


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


def _median_time(fn: object, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@click.command("demo")
@click.option("--batch", type=click.IntRange(1, 4096), default=64, show_default=True, help="Latent batch size B.")
@click.option("--reps", type=click.IntRange(1, 100), default=5, show_default=True, help="Timing repetitions.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(batch: int, reps: int, seed: int) -> None:
    """Print float32 angle accuracy (ours vs naive acos) and TokenSpheres slerp checks/speed."""
    g = torch.Generator().manual_seed(seed)
    click.echo("float32 angle accuracy on S^31 (median relative error vs exact angle of the same inputs)")
    click.echo(f"{'angle (rad)':>12}  {'manifold-fm':>12}  {'acos(dot)':>12}")
    for theta, ours, naive in accuracy_table(g):
        click.echo(f"{theta:>12.4g}  {ours:>12.1e}  {naive:>12.1e}")

    ts = TokenSpheres(32, axis=1)
    shape = (batch, 32, 16, 16)
    x0, x1 = ts.random_base(shape, generator=g), ts.random_base(shape, generator=g)
    t = torch.rand(batch, generator=g)
    with torch.no_grad():
        x_t, u_t = ts.geodesic(x0, x1, t)
        on_sphere = float((x_t.double().norm(dim=1) / ts.radius - 1).abs().max())
        tangency = float(ts.vector_error(x_t, u_t).max())
        speed = u_t.double().norm(dim=1)
        expected = ts.radius * ts.angle(x0, x1).double().squeeze(1)
        speed_err = float(((speed - expected).abs() / expected).max())
        t4 = t.view(-1, 1, 1, 1)
        slerp_s = _median_time(lambda: ts.geodesic(x0, x1, t), reps)
        lerp_s = _median_time(lambda: (x0 + t4 * (x1 - x0), x1 - x0), reps)
    click.echo("")
    click.echo(f"slerp on TokenSpheres(32), batch {shape}, float32")
    click.echo(f"{'max | |x_t| - R | / R':>30}  {on_sphere:.1e}")
    click.echo(f"{'max |<u_t, x_t>| / |u_t||x_t|':>30}  {tangency:.1e}")
    click.echo(f"{'max | |u_t| - R w | / R w':>30}  {speed_err:.1e}")
    click.echo(f"{'slerp time (x_t and u_t)':>30}  {slerp_s * 1e3:.1f} ms")
    click.echo(f"{'linear interpolation time':>30}  {lerp_s * 1e3:.1f} ms  (ratio {slerp_s / lerp_s:.1f}x)")
