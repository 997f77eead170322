"""Why the geodesic path trails the linear one on toy-sphere, toy-hyperbolic and toy-spd in ``toy_nll.md``: the same
runs over several seeds (is the gap larger than the seed-to-seed spread?), and what each path asks the network to
learn (the size of its targets, and how much of it the trained network leaves unexplained).

For each config and seed, ``manifold-fm train --config <config> --path <path> --set train.seed=<seed>`` (the config as
shipped otherwise: equal steps, the same held-out points, as ``eval.seed`` is fixed). Per path:

- test NLL per seed, and the paired difference geodesic - linear (mean and sd over seeds);
- ``E|u_t|^2``: the mean squared norm of the path's training target on 20000 (prior, data, t) draws, as the training
  loss measures it (the loss of predicting 0): the scale of what is regressed;
- the final training loss over ``E|u_t|^2``: the fraction of the target's energy the trained network leaves
  unexplained (the conditional target's irreducible variance plus the fit's error), comparable across paths.

    python benchmarks/geodesic_linear.py                  # writes benchmarks/results/geodesic_linear.{json,md}
    python benchmarks/geodesic_linear.py --quick --out /tmp/b
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from manifold_fm.atomic import write_json_atomic, write_text_atomic

from reporting import add_output_options, command, mean_sd, output_dir, written_by

CONFIGS = ("toy-sphere", "toy-hyperbolic", "toy-spd")
PATHS = ("geodesic", "linear")
QUICK = ["train.steps=10", "eval.test_samples=16", "eval.plot_samples=16", "eval.likelihood_steps=2", "sample.steps=2"]


def target_energy(config: str, path: str, n: int) -> float:
    """``E|u_t|^2`` of the path's training targets (prior x data x uniform t), as the training loss measures it (the
    loss of a network that predicts 0)."""
    from manifold_fm.training.builders import build_flow
    from manifold_fm.training.schema import load_toy_config
    from manifold_fm.training.toy import toy_dataset

    cfg = load_toy_config(config, [f"flow.path={path}"])
    data = toy_dataset(cfg)
    flow = build_flow(cfg.flow, data.manifold)
    g = torch.Generator().manual_seed(0)
    x1 = flow.prepare_data(data.sample(n, g))
    sample, _ = flow.sample_path(x1, g)
    return float(flow.loss(torch.zeros_like(sample.u_t), sample))  # the loss of predicting 0: E|P u_t|^2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--report", action="store_true", help="rebuild the .md from the .json")
    add_output_options(parser)
    args = parser.parse_args()
    out = output_dir(parser, args)
    if args.report:
        write_text_atomic(out / "geodesic_linear.md", report(json.loads((out / "geodesic_linear.json").read_text())))
        return
    from manifold_fm.training.toy import train_toy

    torch.set_num_threads(1)
    seeds = args.seeds[:1] if args.quick else args.seeds
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for config in CONFIGS:
            for path in PATHS:
                energy = target_energy(config, path, 512 if args.quick else 20000)
                for seed in seeds:
                    over = [f"flow.path={path}", f"train.seed={seed}", *(QUICK if args.quick else [])]
                    run = train_toy(config, over, out_dir=Path(work) / f"{config}-{path}-{seed}", progress=False)
                    m = json.loads((run / "metrics.json").read_text())
                    rows.append({"config": config, "path": path, "seed": seed, "test_nll": m["test_nll"],
                                 "test_nll_stderr": m["test_nll_stderr"], "true_nll": m["true_nll"],
                                 "final_loss": m["final_loss"], "target_energy": energy})  # fmt: skip
                    print(f"{config} {path} seed {seed}: test NLL {m['test_nll']:.3f}", flush=True)
    data = {"command": command(), "seeds": seeds, "rows": rows}
    write_json_atomic(out / "geodesic_linear.json", data)
    write_text_atomic(out / "geodesic_linear.md", report(data))
    print(f"written: {out / 'geodesic_linear.json'}, {out / 'geodesic_linear.md'}")


def report(data: dict) -> str:
    rows = data["rows"]
    lines = [
        "# Geodesic against linear path on the toy manifolds, over seeds",
        "",
        written_by(data["command"]),
        "",
        f"Each config as shipped (equal steps), seeds {data['seeds']}, the same held-out points. Test NLL mean ± sd "
        "over seeds; the paired difference geodesic - linear per seed (negative: geodesic better); E|u|^2: mean "
        "squared norm of the path's target; unexplained: final training loss / E|u|^2.",
        "",
        "| config | path | test NLL (mean ± sd) | per seed | E\\|u\\|^2 | final loss | unexplained |",
        "|---|---|---|---|---|---|---|",
    ]
    for config in CONFIGS:
        for path in PATHS:
            sel = [r for r in rows if r["config"] == config and r["path"] == path]
            if not sel:
                continue
            mean, sd = mean_sd([r["test_nll"] for r in sel])
            loss = mean_sd([r["final_loss"] for r in sel])[0]
            energy = sel[0]["target_energy"]
            per = ", ".join(f"{r['test_nll']:.3f}" for r in sel)
            lines.append(
                f"| {config} | {path} | {mean:.3f} ± {sd:.3f} | {per} | {energy:.3f} | {loss:.4f} | "
                f"{loss / energy:.3f} |"
            )
    lines += [
        "",
        "| config | geodesic - linear per seed | mean ± sd | standard error of one test NLL |",
        "|---|---|---|---|",
    ]
    for config in CONFIGS:
        geo = {r["seed"]: r for r in rows if r["config"] == config and r["path"] == "geodesic"}
        lin = {r["seed"]: r for r in rows if r["config"] == config and r["path"] == "linear"}
        diffs = [geo[s]["test_nll"] - lin[s]["test_nll"] for s in geo if s in lin]
        if not diffs:
            continue
        mean, sd = mean_sd(diffs)
        se = sum(r["test_nll_stderr"] for r in geo.values()) / len(geo)
        lines.append(f"| {config} | {', '.join(f'{d:+.3f}' for d in diffs)} | {mean:+.3f} ± {sd:.3f} | {se:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
