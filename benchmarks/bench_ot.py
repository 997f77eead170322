"""What minibatch OT costs per training step: ``OTCoupling.pair`` against the SiT training step it feeds.

Cases: SiT-B/2's latent shape on the FLUX.2 VAE (32 channels, 32 x 32 tokens), batch 256, with ImageNet's 1000
classes (the coupling is conditional: one exact assignment per class present in the batch), and without labels
(one 256 x 256 assignment); the built-in proxy (16 channels, 8 x 8 tokens, batch 64, 12 classes). Each with the
spherical cost (squared geodesic distance summed over the token spheres) and the linear one (squared Euclidean).

The training step is forward + backward + AdamW of the SiT at the same latent shape, one thread, on this CPU. SiT-B/2
at batch 256 does not fit this machine's time budget, so its step is measured at a small batch (``--b2-batch``) and
scaled linearly to 256 (a lower bound: the step's cost grows at least linearly in the batch); the proxy's step is
measured at its batch. Nothing here runs on a GPU: there, the SiT step is ~10^3x faster and the assignment (scipy,
on the CPU) is not, so the share must be measured on the device (``experiments/imagenet_sfm/gpu_check.py``).

The solvers alone: the exact assignment (scipy's ``linear_sum_assignment``, as ``OTCoupling(solver="exact")`` runs
it, float64 on the CPU) against the entropic one (``sinkhorn_log_plan`` + ``plan_to_permutation``, as
``solver="sinkhorn"`` runs it, float32) on one cost matrix per batch (``--solver-batches``, no labels), and the
Sinkhorn permutation's cost above the exact optimum: relative to the optimum, and as the share of what exact OT gains
over the independent pairing that Sinkhorn gives up. The matrix is the linear cost of points on the token spheres of
SiT-B/2's FLUX.2 latent shape, built by one matrix product (the spherical cost at batch 4096 takes tens of minutes on
one CPU thread, and the solvers see only the matrix: both costs are nearly affine in the token dot products, and
Sinkhorn's ``reg`` is relative to the cost's spread).

    python benchmarks/bench_ot.py                    # -> results/ot_cost.{json,md}
    python benchmarks/bench_ot.py --quick --out DIR  # tiny sizes, seconds
    python benchmarks/bench_ot.py --solver-batches 256,1024 --reg 0.01  # other solver rows
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from reporting import add_output_options, command, output_dir, written_by

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--b2-batch", type=int, default=4, help="batch at which SiT-B/2's step is measured")
    add_output_options(parser)
    parser.add_argument("--solver-batches", default="256,1024,4096", help="batches of the solver rows, comma-separated")
    parser.add_argument("--reg", type=float, default=0.05, help="Sinkhorn's relative regularisation (solver rows)")
    args = parser.parse_args()
    out = output_dir(parser, args)
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch
    from scipy.optimize import linear_sum_assignment

    from manifold_fm.atomic import write_json_atomic, write_text_atomic
    from manifold_fm.coupling import OTCoupling, plan_to_permutation, sinkhorn_log_plan
    from manifold_fm.manifolds import Euclidean, TokenSpheres
    from manifold_fm.models.sit import build_sit
    from manifold_fm.timing import timed

    torch.set_num_threads(1)
    reps = 1 if args.quick else args.reps
    # name -> (SiT config, channels, side, batch, classes or None, batch at which the step is measured)
    cases = {
        "SiT-B/2, FLUX.2 latents": ("SiT-B/2", 32, 32, 256, 1000, args.b2_batch),
        "SiT-B/2, FLUX.2 latents, no labels": ("SiT-B/2", 32, 32, 256, None, args.b2_batch),
        "built-in proxy (SiT-Micro/2)": ("SiT-Micro/2", 16, 8, 64, 12, 64),
    }
    if args.quick:
        cases = {"quick": ("SiT-Micro/2", 8, 4, 16, 4, 16)}
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, (arch, channels, side, batch, classes, step_batch) in cases.items():
        spheres = TokenSpheres(channels)
        x1 = spheres.projx(torch.randn(batch, channels, side, side, generator=g))
        x0 = spheres.projx(torch.randn(batch, channels, side, side, generator=g))
        labels = None if classes is None else torch.randint(0, classes, (batch,), generator=g)
        fns = {
            "spherical": lambda x0=x0, x1=x1, y=labels, c=OTCoupling(spheres): c.pair(x0, x1, y),
            "linear": lambda x0=x0, x1=x1, y=labels, c=OTCoupling(Euclidean()): c.pair(x0, x1, y),
        }
        model = build_sit(arch, input_size=side, in_channels=channels, num_classes=classes or 1, time_scale=1000.0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        xb = x1[:step_batch]
        tb = torch.rand(step_batch, generator=g)
        yb = torch.zeros(step_batch, dtype=torch.long)

        def step(model=model, opt=opt, xb=xb, tb=tb, yb=yb) -> None:
            loss = (model(xb, tb, yb) - xb).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        pair = timed(fns, reps)
        train = timed({"step": step}, max(1, min(reps, 3)))["step"]
        step_cpu = train.cpu_s * batch / step_batch
        rows.append(
            {
                "case": name,
                "batch": batch,
                "latent": [channels, side, side],
                "classes": classes,
                "ot_cpu_s": {k: t.cpu_s for k, t in pair.items()},
                "step_cpu_s": step_cpu,
                "step_measured_at_batch": step_batch,
                "share": {k: t.cpu_s / step_cpu for k, t in pair.items()},
            }
        )
        print(name, {k: f"{t.cpu_s * 1e3:.1f} ms" for k, t in pair.items()}, f"step {step_cpu:.2f} s", flush=True)
    # the solvers alone, on one (linear) cost matrix per batch
    solver_rows = []
    channels, side = (8, 4) if args.quick else (32, 32)
    spheres = TokenSpheres(channels)
    for batch in (16, 48) if args.quick else [int(b) for b in args.solver_batches.split(",")]:
        x0 = spheres.projx(torch.randn(batch, channels, side, side, generator=g)).reshape(batch, -1)
        x1 = spheres.projx(torch.randn(batch, channels, side, side, generator=g)).reshape(batch, -1)
        cost = (x0.square().sum(1)[:, None] + x1.square().sum(1)[None, :] - 2 * x0 @ x1.T).clamp_min(0)
        del x0, x1
        result = {}

        def exact(cost=cost, result=result) -> None:
            rows, cols = linear_sum_assignment(cost.to(torch.float64).numpy())
            result["exact"] = torch.as_tensor(rows[np.argsort(cols)])

        def sinkhorn(cost=cost, result=result) -> None:
            result["sinkhorn"] = plan_to_permutation(sinkhorn_log_plan(cost, args.reg))

        solve = timed({"exact": exact, "sinkhorn": sinkhorn}, max(1, min(reps, 3)))
        c64, cols = cost.to(torch.float64), torch.arange(batch)
        best, indep, got = (float(c64[p, cols].sum()) for p in (result["exact"], cols, result["sinkhorn"]))
        solver_rows.append(
            {
                "batch": batch,
                "latent": [channels, side, side],
                "reg": args.reg,
                "solve_cpu_s": {k: t.cpu_s for k, t in solve.items()},
                "gap_rel": (got - best) / best,
                "gain_lost": (got - best) / (indep - best),
            }
        )
        print(f"solvers, batch {batch}", {k: f"{t.cpu_s * 1e3:.1f} ms" for k, t in solve.items()}, flush=True)
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, 1 thread",
        "command": command(),
    }
    lines = [
        "| case | batch | OT, spherical cost | OT, linear cost | SiT step (fwd + bwd + AdamW) | OT share of the step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        scaled = "" if r["step_measured_at_batch"] == r["batch"] else f" (measured at {r['step_measured_at_batch']})"
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['ot_cpu_s']['spherical'] * 1e3:.1f} ms | "
            f"{r['ot_cpu_s']['linear'] * 1e3:.1f} ms | {r['step_cpu_s']:.2f} s{scaled} | "
            f"{r['share']['spherical']:.2%} / {r['share']['linear']:.2%} |"
        )
    lines += [
        "",
        "| batch (no labels) | exact solve (scipy, float64) | Sinkhorn solve + rounding (float32) | Sinkhorn cost "
        "above the optimum | share of OT's gain given up |",
        "|---|---|---|---|---|",
    ]
    for r in solver_rows:
        lines.append(
            f"| {r['batch']} | {r['solve_cpu_s']['exact'] * 1e3:.1f} ms | {r['solve_cpu_s']['sinkhorn'] * 1e3:.1f} ms "
            f"| {r['gap_rel']:.2e} | {r['gain_lost']:.2%} |"
        )
    lines += [
        "",
        f"The solvers alone on one cost matrix per batch: the linear cost of points on the token spheres of "
        f"{'x'.join(map(str, solver_rows[0]['latent']))} latents, Sinkhorn at reg {args.reg:g} (relative to the "
        "cost's spread), its plan rounded greedily to a permutation. The share of OT's gain is (Sinkhorn - exact) / "
        "(independent pairing - exact), all three in total cost. Sinkhorn runs on the cost's device (a GPU in "
        "training), the exact solver always on the CPU.",
    ]
    lines += [
        "",
        f"Medians of process CPU time, {meta['date']}, {meta['machine']}. A step measured at a smaller batch is "
        "scaled linearly to the batch (a lower bound on its cost). CPU only: on a GPU the step shrinks by orders of "
        "magnitude and the exact assignment (scipy, on the CPU) does not, so the share there is unmeasured.",
        "",
        written_by(meta["command"]),
    ]
    write_json_atomic(out / "ot_cost.json", {**meta, "rows": rows, "solver_rows": solver_rows})
    write_text_atomic(out / "ot_cost.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
