"""The paper's four-arm ablation on the built-in proxy, over several seeds, and the steps each arm needs to reach the
linear baseline's final quality.

Every seed is one default run (``manifold-fm train``: built-in tokenizer, decoder finetune, every arm trained with the
same budget, optimiser and seed, each sampled and scored) with all four flow presets as its modes::

    manifold-fm train --set "modes=[linear,shell,spherical-linear,spherical]" --set train.seed=SEED

The table is the mean and the spread (sample standard deviation) over the seeds of the built-in classifier's
Fréchet distance and accuracy on the final samples, per arm. Steps to threshold, per seed: the first evaluation at
which the arm's FD reaches the linear arm's final FD, the table's own number. The runs evaluate every
``--eval-every`` steps (100) during training on as many samples as the final table (``eval.samples`` set to
``eval.num_samples``), and each arm's curve ends with its final evaluation, the table's; the step is read off the
evaluations, not interpolated between them (the crossing lies in the ``--eval-every`` steps before it). Reported as
mean ± sd over the seeds that reach it, with the ratio of the linear arm's steps to the arm's (the paper: spherical
reaches FID 30 in about 2.2x fewer steps than linear).

    python benchmarks/ablation.py                      # seeds 0 1 2 (a stopped run resumes where it was)
    python benchmarks/ablation.py --report             # rebuild the table and plot from the saved runs' results
    python benchmarks/ablation.py --quick              # a tiny run of the whole script (a smoke run, minutes)

Writes ``benchmarks/results/ablation.json`` (every number), ``ablation.md`` (the table) and ``ablation.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from reporting import add_output_options, mean_sd, output_dir

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ARMS = ("linear", "shell", "spherical-linear", "spherical")
# what each arm's samples are decoded with, so the ceiling its accuracy is compared with
RECONSTRUCTIONS = {
    "linear": "reconstructions (base decoder)",
    "shell": "reconstructions (base decoder)",
    "spherical-linear": "reconstructions (spherical, finetuned decoder)",
    "spherical": "reconstructions (spherical, finetuned decoder)",
}
METRIC = "fd_builtin_classifier"
#: Steps between two evaluations during training (the resolution of the steps to threshold).
EVAL_EVERY = 100
#: --quick: a default run shrunk to about a minute (two arms, two evaluations during training).
QUICK = [
    "data.per_class=3",
    "data.test_per_class=2",
    "finetune.steps=2",
    "finetune.batch_size=4",
    "train.steps=4",
    "train.batch_size=12",
    "eval.num_samples=24",
    "sample.steps=2",
    "train.threads=1",
    "parallel=false",
]


def evaluation_settings(overrides: list[str], every: int) -> list[str]:
    """The overrides that make the evaluations during training comparable with the final table: every ``every``
    steps, on as many samples as the final evaluation (``eval.samples`` = ``eval.num_samples``)."""
    from manifold_fm.training.schema import load_run_config

    cfg = load_run_config("default", overrides)
    return [f"train.eval_every={every}", f"eval.samples={cfg.eval.num_samples}"]


def run_seed(seed: int, work: Path, overrides: list[str], arms: tuple[str, ...]) -> Path:
    """One default run with the arms (resumed if a previous call stopped it); its folder."""
    from manifold_fm.training.default_run import run_default

    out = work / f"seed{seed}"
    if (out / "results.json").is_file():
        return out
    settings = [f"modes=[{','.join(arms)}]", f"train.seed={seed}", *overrides]
    t0 = time.perf_counter()
    run_default(None, settings, out, resume=(out / "config.yaml").is_file(), progress=False, echo=lambda *a: None)
    print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def summarise(run: Path, arms: tuple[str, ...] = ARMS) -> dict:
    """One seed's numbers: each arm's final scores, its accuracy over its decoder's reconstructions, its FD curve
    (the evaluations during training, then the final one) and the first evaluated step at which it reaches the
    linear arm's final FD (the table's)."""
    from manifold_fm.eval.over_training import compare_runs

    results = json.loads((run / "results.json").read_text())
    finals = {arm: (results["modes"][arm]["steps"], results["modes"][arm][METRIC]) for arm in arms}
    threshold = finals["linear"][1]
    reached = compare_runs({arm: run / arm for arm in arms}, METRIC, threshold=threshold, finals=finals)
    refs = results["references"]
    return {
        "seed": results["config"]["train"]["seed"],
        "total_s": results["total_s"],
        "threshold": threshold,
        "samples": {"final": results["config"]["eval"]["num_samples"], "during": results["config"]["eval"]["samples"]},
        "eval_every": results["config"]["train"]["eval_every"],
        "arms": {
            arm: {
                METRIC: results["modes"][arm][METRIC],
                "classifier_accuracy": results["modes"][arm]["classifier_accuracy"],
                "of_reconstructions": results["modes"][arm]["classifier_accuracy"]
                / refs[RECONSTRUCTIONS[arm]]["classifier_accuracy"],
                "final_loss": results["modes"][arm]["final_loss"],
                "curve": reached["curves"][arm],
                "steps_to_threshold": reached["steps_to_threshold"][arm],
                "evaluated_before": reached["evaluated_before"][arm],
                "speedup_over_linear": reached["speedup_over_reference"][arm],
            }
            for arm in arms
        },
    }


def table(rows: list[dict], command: str, arms: tuple[str, ...] = ARMS) -> str:
    lines = [
        "| arm | FD-builtin-classifier ↓ | classifier accuracy ↑ | (of reconstructions) | steps to linear's final FD | "
        "speedup over linear |",
        "|---|---|---|---|---|---|",
    ]
    for arm in arms:
        fd = mean_sd([r["arms"][arm][METRIC] for r in rows])
        acc = mean_sd([r["arms"][arm]["classifier_accuracy"] for r in rows])
        share = statistics.mean(r["arms"][arm]["of_reconstructions"] for r in rows)
        steps = [r["arms"][arm]["steps_to_threshold"] for r in rows]
        speed = [r["arms"][arm]["speedup_over_linear"] for r in rows]
        reached = [s for s in steps if s is not None]
        steps_text = "never" if not reached else "{:.0f} ± {:.0f}".format(*mean_sd(reached))
        if len(reached) < len(steps):
            steps_text += f" ({len(reached)} of {len(steps)} seeds)"
        speeds = [s for s in speed if s is not None]
        speed_text = "{:.2f}x ± {:.2f}".format(*mean_sd(speeds)) if speeds else "-"
        lines.append(
            f"| {arm} | {fd[0]:.2f} ± {fd[1]:.2f} | {acc[0]:.3f} ± {acc[1]:.3f} | {share:.0%} | {steps_text} | "
            f"{speed_text} |"
        )
    seeds = ", ".join(str(r["seed"]) for r in rows)
    every = sorted({r.get("eval_every") for r in rows}, key=str)
    during = sorted({(r.get("samples") or {}).get("during") for r in rows}, key=str)
    lines += [
        "",
        f"Mean ± sample standard deviation over seeds {seeds}. FD-builtin-classifier and accuracy: the built-in "
        "classifier on each arm's final class-balanced samples (EMA weights); '(of reconstructions)': that accuracy "
        "over the accuracy on held-out reconstructions through the arm's decoder (base decoder for the vanilla "
        "arms, the finetuned spherical decoder for the spherical-latent arms). Steps to linear's final FD, per "
        "seed: the first evaluation at which the arm's FD reaches the linear arm's final FD (the table's number "
        f"for that seed); evaluations every {', '.join(map(str, every))} steps during training on "
        f"{', '.join(map(str, during))} samples with fixed noise (as many as the final table), then the final "
        "evaluation; read off the evaluations, not interpolated (the crossing lies in the steps since the one "
        "before). Mean ± sd over the seeds that reach it; speedup: linear's steps over the arm's, mean ± sd over "
        "those seeds.",
        "",
        f"Written by `{command}`.",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, arms: tuple[str, ...] = ARMS) -> None:
    from manifold_fm.eval.plots import pyplot, save_figure

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, arm in enumerate(arms):
        values = [r["arms"][arm][METRIC] for r in rows]
        left.scatter([i] * len(values), values, s=14, color="0.5", zorder=2)
        left.bar(i, statistics.mean(values), color=f"C{i}", alpha=0.8, zorder=1)
        steps = sorted({s for r in rows for s, _ in r["arms"][arm]["curve"]})
        mean_curve = [
            statistics.mean(dict(r["arms"][arm]["curve"])[s] for r in rows if s in dict(r["arms"][arm]["curve"]))
            for s in steps
        ]
        right.plot(steps, mean_curve, marker="o", color=f"C{i}", label=arm)
    left.set_xticks(range(len(arms)), arms, rotation=15)
    left.set_ylabel("FD-builtin-classifier (final, lower is better)")
    left.set_title(f"{len(arms)} arms, {len(rows)} seeds (dots)")
    right.axhline(statistics.mean(r["threshold"] for r in rows), color="0.4", ls="--", lw=1, label="linear, last")
    right.set_xlabel("training step")
    right.set_ylabel("FD-builtin-classifier during training")
    right.set_yscale("log")
    right.legend(fontsize=8)
    right.set_title("mean over seeds")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("runs/ablation"), help="where the runs go (kept)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="the flow presets to train")
    parser.add_argument("--name", default="ablation", help="results/<name>.{json,md,png}")
    parser.add_argument("--report", action="store_true", help="only rebuild the outputs from the saved runs")
    parser.add_argument(
        "--eval-every", type=int, default=None, help=f"steps between evaluations during training ({EVAL_EVERY})"
    )
    add_output_options(parser)
    args = parser.parse_args()
    if "linear" not in args.arms:
        parser.error("--arms must include linear (the reference of the steps-to-threshold ratio)")
    arms = tuple(a for a in ARMS if a in args.arms)
    sys.path.insert(0, str(ROOT))
    from manifold_fm.atomic import write_json_atomic, write_text_atomic

    results = output_dir(parser, args)
    overrides = list(args.overrides)
    if args.quick:
        arms, args.seeds = ("linear", "spherical"), args.seeds[:1]
        if args.work == Path("runs/ablation"):
            args.work = results / "runs"
        overrides = [*QUICK, *overrides]
    every = args.eval_every or (2 if args.quick else EVAL_EVERY)
    overrides = [*overrides, *evaluation_settings(overrides, every)]
    rows = []
    for seed in args.seeds:
        run = args.work / f"seed{seed}" if args.report else run_seed(seed, args.work, overrides, arms)
        rows.append(summarise(run, arms))
    command = f"python benchmarks/ablation.py --work {args.work} --seeds " + " ".join(map(str, args.seeds))
    if args.quick:
        command = f"python benchmarks/ablation.py --quick --out {results}"
    elif arms != ARMS:
        command += f" --arms {' '.join(arms)} --name {args.name}"
    if args.eval_every is not None:
        command += f" --eval-every {args.eval_every}"
    command += "".join(f" --set {o}" for o in args.overrides)
    write_json_atomic(results / f"{args.name}.json", {"command": command, "arms": list(arms), "rows": rows})
    write_text_atomic(results / f"{args.name}.md", table(rows, command, arms) + "\n")
    plot(rows, results / f"{args.name}.png", arms)
    print(table(rows, command, arms))


if __name__ == "__main__":
    main()
