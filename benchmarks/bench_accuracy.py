"""float32 angle accuracy on the sphere: ours vs geoopt, naive acos, the half-angle form (and flow_matching if present).

For each angle the script draws float32 pairs ``(x, y)`` on the unit sphere of R^dim at that angle and measures the
relative error of each method's float32 distance against the exact angle between the *same* float32 inputs,
recomputed in float64 (half-angle formula on normalised vectors). It also reports whether ``dist(x, x)`` is NaN.

    python benchmarks/bench_accuracy.py            # writes benchmarks/results/accuracy.{json,md}
    PYTHONPATH=/tmp/fm python benchmarks/bench_accuracy.py   # with flow_matching importable (as committed):
                                                   # pip install --no-deps --target /tmp/fm flow_matching==1.0.10
    python benchmarks/bench_accuracy.py --quick --out /tmp/bench   # 64 pairs per angle (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from datetime import datetime, timezone

import torch
from torch import Tensor

from manifold_fm.atomic import write_text_atomic
from manifold_fm.manifolds import Sphere
from manifold_fm.manifolds.testing import angle_pairs, exact_angle

from reporting import add_output_options, command, output_dir, written_by

ANGLES = [1e-6, 1e-5, 1e-4, 5e-4, 1e-3, 1e-2, 0.1, 1.0, 2.0, 3.0, 3.1, math.pi - 1e-3]


def methods() -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    import geoopt

    ours = Sphere(1.0)
    gs = geoopt.Sphere()
    out: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "manifold-fm Sphere.dist": lambda x, y: ours.dist(x, y),
        "geoopt Sphere.dist": lambda x, y: gs.dist(x, y),
        "naive acos(clamp(dot(x, y)))": lambda x, y: torch.acos((x * y).sum(-1).clamp(-1.0, 1.0)),
        "half-angle 2 atan2(norm(x-y), norm(x+y))": lambda x, y: (
            2 * torch.atan2((x - y).norm(dim=-1), (x + y).norm(dim=-1))
        ),
    }
    try:  # optional peer, never a requirement
        from flow_matching.utils.manifolds import Sphere as FMSphere  # type: ignore[import-not-found]

        fm = FMSphere()
        out["flow_matching Sphere.dist"] = lambda x, y: fm.dist(x, y).reshape(x.shape[0])
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        pass
    return out


def _flow_matching_version() -> str | None:
    try:
        import flow_matching  # type: ignore[import-not-found]
    except ImportError:
        return None
    return getattr(flow_matching, "__version__", "unknown")


def measure(n: int, dim: int) -> dict:
    rows = []
    fns = methods()
    for theta in ANGLES:
        x, y = angle_pairs(theta, n, dim)
        ref = exact_angle(x, y)
        row = {"angle": theta}
        for name, fn in fns.items():
            with torch.no_grad():
                val = fn(x, y).double().reshape(-1)
            rel = (val - ref).abs() / ref
            row[name] = {"median": float(rel.median()), "max": float(rel.max())}
        rows.append(row)
    x, _ = angle_pairs(1.0, n, dim)
    nan_self = {name: bool(torch.isnan(fn(x, x)).any()) for name, fn in fns.items()}
    floor = {name: float(fn(x, x).abs().max()) for name, fn in fns.items()}
    return {
        "command": command(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "n_pairs": n,
        "dim": dim,
        "methods": list(fns),
        "flow_matching": _flow_matching_version(),
        "rows": rows,
        "dist_x_x_is_nan": nan_self,
        "dist_x_x_max": floor,
    }


def to_markdown(res: dict) -> str:
    names = res["methods"]
    lines = [
        f"# float32 sphere distance accuracy ({res['date']}, torch {res['torch']}, "
        f"{res['n_pairs']} pairs in R^{res['dim']} per angle)",
        "",
        "Relative error of the float32 distance against the exact angle between the same float32 inputs (float64), "
        f"median / max over the pairs. {written_by()}"
        + (
            f" flow_matching {res['flow_matching']} was importable for this run (it is not a dependency of "
            "manifold-fm); NaN: its unclamped acos returned NaN."
            if res.get("flow_matching")
            else ""
        ),
        "",
        "| angle (rad) | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for row in res["rows"]:
        cells = [f"{row[n]['median']:.1e} / {row[n]['max']:.1e}" for n in names]
        lines.append(f"| {row['angle']:.4g} | " + " | ".join(cells) + " |")
    lines.append(
        "| dist(x, x) | "
        + " | ".join("NaN" if res["dist_x_x_is_nan"][n] else f"{res['dist_x_x_max'][n]:.1e}" for n in names)
        + " |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=None, help="pairs per angle (default 2000; --quick: 64)")
    parser.add_argument("--dim", type=int, default=32)
    add_output_options(parser)
    args = parser.parse_args()
    out = output_dir(parser, args)
    res = measure(args.pairs or (64 if args.quick else 2000), args.dim)
    md = to_markdown(res)
    write_text_atomic(out / "accuracy.json", json.dumps(res, indent=2) + "\n")
    write_text_atomic(out / "accuracy.md", md)
    print(md)


if __name__ == "__main__":
    main()
