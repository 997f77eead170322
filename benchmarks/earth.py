"""The earth-science sets on S^2 (volcano, earthquake, flood, fire): test NLL of our manifold runs beside the published
rows, with the budget that bought it, and test NLL against training budget.

Each set is one ``kind: manifold`` run of the built-in ``manifold-latlon`` config on the set's CSV (latitude,
longitude in degrees; comment and header lines skipped), i.e. what

    manifold-fm train --config manifold-latlon --set data.file=DIR/<file>.csv --set train.steps=N ...

runs: the protocol of the papers (a seeded 80/10/10 random split; validation NLL every ``eval.val_every`` steps, the
best weights kept, early stopping; test NLL of the best weights). ``--minutes`` sets each run's training budget: a
short probe measures this machine's steps per second and ``train.steps`` is chosen to fit (validations included).
The curve: the test NLL of the kept checkpoints' EMA weights (``train.keep_every``), against their step.

The data are not downloaded: put the CSVs in ``--data`` (``volerup.csv``, ``quakes_all.csv``, ``flood.csv``,
``fire.csv``, as in the data folders of the riemannian-score-sde and riemannian-fm projects).

    python -m benchmarks earth --data /path/to/earth                # writes benchmarks/results/earth.{json,md}
    python benchmarks/earth.py --data DIR --minutes 30 --seeds 0 1 2 3 4
    python benchmarks/earth.py --data DIR --quick --out /tmp/b      # tiny (a smoke run)
    python benchmarks/earth.py --report                             # rebuild earth.md from earth.json
    python benchmarks/earth.py --data DIR --ema-study volcano       # EMA settings on a short run: earth_ema.{json,md}
    python benchmarks/earth.py --data DIR --recipe-study earthquake # one recipe change at a time: earth_recipe.*
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from manifold_fm.atomic import write_json_atomic, write_text_atomic
from manifold_fm.training.schema import load_toy_config

from reporting import add_output_options, command, mean_sd, output_dir, written_by

#: set -> file name in --data
SETS = {"volcano": "volerup.csv", "earthquake": "quakes_all.csv", "flood": "flood.csv", "fire": "fire.csv"}
#: published test NLL (mean, sd over 5 seeds): Riemannian FM (Chen & Lipman 2024), Riemannian score-based
#: (De Bortoli et al. 2022)
PUBLISHED = {
    "Riemannian FM": {
        "volcano": (-7.93, 1.67),
        "earthquake": (-0.28, 0.08),
        "flood": (1.42, 0.09),
        "fire": (-1.86, 0.02),
    },
    "Riemannian score-based": {
        "volcano": (-4.92, 0.25),
        "earthquake": (-0.19, 0.07),
        "flood": (0.45, 0.17),
        "fire": (-1.33, 0.06),
    },
}
#: the recipe on top of manifold-latlon (model, batch, EMA, validation), fixed for every set
RECIPE = [
    "model.hidden=256",
    "model.depth=4",
    "train.batch_size=512",
    "optim.lr=0.001",
    "optim.schedule=cosine",
    "train.ema_decay=0.999",
    "train.ema_warmup=10",
    "eval.likelihood_steps=32",
    "eval.check_steps=64",
    "eval.val_steps=16",
    "eval.patience=10",
    "eval.plot_samples=3000",
    "train.log_every=100",
]
QUICK = ["model.hidden=16", "train.batch_size=32", "eval.likelihood_steps=2", "eval.check_steps=4", "eval.val_steps=2",
         "sample.steps=2", "eval.plot_samples=50", "train.log_every=5"]  # fmt: skip
CURVE_POINTS = 6


def _overrides(csv: Path, steps: int, seed: int, quick: bool) -> list[str]:
    val_every = max(1, steps // 40)
    return [
        *RECIPE,
        *(QUICK if quick else []),
        f"data.file={csv}",
        f"train.steps={steps}",
        f"train.seed={seed}",
        f"data.split_seed={seed}",
        f"eval.val_every={val_every}",
        f"train.checkpoint_every={max(1, steps // CURVE_POINTS)}",
        f"train.keep_every={max(1, steps // CURVE_POINTS)}",
        "train.keep_checkpoints=1",
        f"optim.warmup_steps={max(1, min(200, steps // 20))}",
    ]


def steps_per_second(csv: Path, work: Path, quick: bool) -> float:
    """Training steps per second of the recipe on this machine: the throughput of the last logged window of a
    400-step probe run (validations off), after its start-up."""
    from manifold_fm.training.toy import train_toy

    probe = 20 if quick else 400
    out = work / "probe"
    over = [*_overrides(csv, probe, 0, quick), "eval.val_every=null", "eval.patience=null", "eval.check_steps=0"]
    train_toy("manifold-latlon", over, out_dir=out, progress=False, overwrite=True)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    batch = load_toy_config(out / "config.yaml").train.batch_size
    return [r for r in log if "samples_per_s" in r][-1]["samples_per_s"] / batch


def curve(run: Path) -> list[dict[str, float]]:
    """Test NLL of the EMA weights of every kept checkpoint of ``run`` (the run's test split and solver)."""
    from manifold_fm.training.checkpoint import checkpoint_step, list_checkpoints, load_checkpoint
    from manifold_fm.training.schema import load_toy_config
    from manifold_fm.training.toy import nll, run_data, toy_model

    cfg = load_toy_config(run / "config.yaml")
    data = run_data(cfg, run)
    points = []
    for path in list_checkpoints(run / "checkpoints"):
        ckpt = load_checkpoint(path)
        model = toy_model(cfg, data)
        model.load_state_dict(ckpt.ema if ckpt.ema is not None else ckpt.model)
        gen = torch.Generator().manual_seed(cfg.eval.seed)
        mean, se = nll(model, data.test, data.manifold, cfg, cfg.eval.likelihood_steps, gen)
        points.append({"step": checkpoint_step(path), "test_nll": mean, "test_nll_stderr": se})
    return points


def run_set(name: str, csv: Path, minutes: float, seed: int, work: Path, quick: bool) -> dict:
    from manifold_fm.training.toy import train_toy

    rate = steps_per_second(csv, work / name, quick)
    # validations (40 per run) and checkpoints take about a tenth of the time at these sizes
    steps = 30 if quick else max(200, int(minutes * 60 * rate * 0.9))
    out = work / name / f"seed{seed}"
    t0 = time.perf_counter()
    train_toy("manifold-latlon", _overrides(csv, steps, seed, quick), out_dir=out, progress=False, overwrite=True)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "set": name,
        "seed": seed,
        "steps": steps,
        "steps_trained": metrics["steps_trained"],
        "best_step": metrics.get("best_step"),
        "test_nll": metrics["test_nll"],
        "test_nll_stderr": metrics["test_nll_stderr"],
        "test_nll_check": metrics.get("test_nll_check"),
        "solver_converged": metrics.get("solver_converged"),
        "likelihood_solver": metrics["likelihood_solver"],
        "points": {k: metrics[f"{k}_points"] for k in ("train", "val", "test")},
        "train_seconds": metrics["train_seconds"],
        "wall_seconds": round(wall, 1),
        "probe_steps_per_second": round(rate, 1),
        "curve": curve(out),
    }


#: EMA settings compared by ``--ema-study`` (the rest of the recipe fixed)
EMA_ARMS = {
    "ema 0.999, no warm-up": ["train.ema_decay=0.999", "train.ema_warmup=0"],
    "ema 0.999, warm-up 10": ["train.ema_decay=0.999", "train.ema_warmup=10"],
    "no ema (raw weights)": ["train.ema_decay=0.0", "train.ema_warmup=0"],
}


def ema_study(name: str, csv: Path, steps: int, work: Path, quick: bool) -> dict:
    """Validation NLL of a short run (``steps`` steps, constant learning rate after warm-up, no early stopping) under
    each :data:`EMA_ARMS` setting, at every validation."""
    from manifold_fm.training.toy import train_toy

    steps = 20 if quick else steps
    arms = {}
    for arm, over in EMA_ARMS.items():
        out = work / "ema" / arm.replace(" ", "_").replace(",", "")
        extra = [*_overrides(csv, steps, 0, quick), *over, "optim.schedule=constant", "eval.patience=null"]
        extra += [f"eval.val_every={max(1, steps // 5)}", "eval.check_steps=0"]
        train_toy("manifold-latlon", extra, out_dir=out, progress=False, overwrite=True)
        log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        arms[arm] = [{"step": r["step"], "val_nll": r["val_nll"]} for r in log if "val_nll" in r]
    return {"set": name, "steps": steps, "arms": arms}


#: recipe changes compared by ``--recipe-study`` (each on top of the recipe, at equal steps)
RECIPE_ARMS = {
    "recipe (256 x 4, lr 1e-3, uniform t)": [],
    "width 512": ["model.hidden=512"],
    "depth 6": ["model.depth=6"],
    "lr 2e-3": ["optim.lr=0.002"],
    "logit-normal t": ["flow.time=logit_normal"],
}


def recipe_study(name: str, csv: Path, steps: int, work: Path, quick: bool) -> dict:
    """Test NLL and training time of each :data:`RECIPE_ARMS` change at equal steps (no early stopping)."""
    from manifold_fm.training.toy import train_toy

    steps = 20 if quick else steps
    arms = {}
    for arm, over in RECIPE_ARMS.items():
        out = work / "recipe" / str(len(arms))
        extra = [*_overrides(csv, steps, 0, quick), *over, "eval.patience=null", "eval.check_steps=0"]
        train_toy("manifold-latlon", extra, out_dir=out, progress=False, overwrite=True)
        m = json.loads((out / "metrics.json").read_text())
        arms[arm] = {k: m[k] for k in ("test_nll", "test_nll_stderr", "best_val_nll", "train_seconds")}
    return {"set": name, "steps": steps, "arms": arms}


def recipe_report(data: dict) -> str:
    lines = [
        f"# Recipe changes on {data['set']} at equal steps ({data['steps']} steps)",
        "",
        written_by(data["command"]),
        "",
        "Each row changes one thing of the earth recipe (seed 0, the same split, cosine schedule over the same steps, "
        "best weights by validation NLL); test NLL ± standard error over the test points, and the training time.",
        "",
        "| change | test NLL | best val NLL | train s |",
        "|---|---|---|---|",
    ]
    for arm, m in data["arms"].items():
        lines.append(
            f"| {arm} | {m['test_nll']:.3f} ± {m['test_nll_stderr']:.3f} | {m['best_val_nll']:.3f} | "
            f"{m['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def ema_report(data: dict) -> str:
    steps = [p["step"] for p in next(iter(data["arms"].values()))]
    lines = [
        f"# EMA settings on a short run ({data['set']}, {data['steps']} steps)",
        "",
        written_by(data["command"]),
        "",
        "Validation NLL (nats, lower is better) of the weights each setting evaluates, at each validation: the "
        "earth recipe with a constant learning rate after warm-up. EMA warm-up: the decay after n updates is "
        "min(decay, (1 + n) / (10 + n)), so the average starts at the weights instead of at the initialisation.",
        "",
        "| setting | " + " | ".join(f"step {s}" for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for arm, points in data["arms"].items():
        lines.append(f"| {arm} | " + " | ".join(f"{p['val_nll']:.3f}" for p in points) + " |")
    return "\n".join(lines) + "\n"


def extrapolate(row: dict, target: float) -> float | None:
    """Steps at which a log-linear fit ``test NLL = a + b log10(step)`` of the last four points of the row's curve
    reaches ``target`` (``None`` if the curve is not falling). An extrapolation, not a measurement."""
    import math

    pts = [p for p in row["curve"] if p["step"] > 0][-4:]
    if len(pts) < 2:
        return None
    xs, ys = [math.log10(p["step"]) for p in pts], [p["test_nll"] for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    if b >= 0:
        return None
    return 10 ** (mx + (target - my) / b)


def report(data: dict) -> str:
    lines = [
        "# Earth-science sets on S^2: test NLL",
        "",
        written_by(data["command"]),
        "",
        f"Machine: {data['machine']}; {data['date']}. Recipe (on the `manifold-latlon` config): "
        f"`{' '.join(data['recipe'])}`; {data['minutes']} min of training per set and seed, seeds {data['seeds']}.",
        "Protocol: seeded 80/10/10 random split; validation NLL every steps/40 steps selects the best weights "
        "(early stopping after 10 validations without improvement); test NLL (nats, lower is better) of those "
        "weights, mean ± sd over seeds (± standard error over test points for one seed).",
        "",
        "| set | ours | Riemannian FM | Riemannian score-based | steps (trained) | wall time | solver check |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in SETS:
        rows = [r for r in data["runs"] if r["set"] == name]
        if not rows:
            continue
        nlls = [r["test_nll"] for r in rows]
        mean, sd = mean_sd(nlls)
        spread = sd if len(rows) > 1 else rows[0]["test_nll_stderr"]
        pub = [PUBLISHED[k][name] for k in ("Riemannian FM", "Riemannian score-based")]
        trained = ", ".join(f"{r['steps']} ({r['steps_trained']})" for r in rows)
        wall = ", ".join(f"{r['wall_seconds'] / 60:.1f} min" for r in rows)
        check = ", ".join(
            f"{r['test_nll_check']:.3f} at twice the steps" if r["test_nll_check"] is not None else "-" for r in rows
        )
        lines.append(
            f"| {name} | {mean:.2f} ± {spread:.2f} | {pub[0][0]:.2f} ± {pub[0][1]:.2f} | "
            f"{pub[1][0]:.2f} ± {pub[1][1]:.2f} | {trained} | {wall} | {check} |"
        )
    lines += ["", "## Against the published rows", ""]
    for name in SETS:
        rows = [r for r in data["runs"] if r["set"] == name]
        if not rows:
            continue
        mean = mean_sd([r["test_nll"] for r in rows])[0]
        sb, fm = PUBLISHED["Riemannian score-based"][name][0], PUBLISHED["Riemannian FM"][name][0]
        verdict = "reaches" if mean <= sb else "does not reach"
        line = (
            f"- {name}: ours {mean:.2f} {verdict} the score-based row ({sb:.2f}; gap {mean - sb:+.2f} nats); "
            f"gap to Riemannian FM ({fm:.2f}): {mean - fm:+.2f} nats."
        )
        row = rows[0]
        rate = row["steps_trained"] / max(row["train_seconds"], 1e-9)
        for label, target in (("score-based", sb), ("Riemannian FM", fm)):
            if mean <= target:
                continue
            need = extrapolate(row, target)
            if need is None or need > 1e10:
                line += (
                    f" The test-NLL curve flattens: extrapolated, more steps of this model would not reach {label} "
                    "(a larger model or another recipe would be needed)."
                )
            else:
                line += (
                    f" Extrapolating the curve (log-linear in steps, not a measurement): {label} at about "
                    f"{need:.2g} steps, {need / rate / 3600:.2g} h at this machine's {rate:.0f} steps/s."
                )
        lines.append(line)
    lines += ["", "## Test NLL against training budget", ""]
    for row in data["runs"]:
        pts = ", ".join(f"{p['step']}: {p['test_nll']:.2f}" for p in row["curve"])
        lines.append(f"- {row['set']} (seed {row['seed']}), step: test NLL of the EMA weights: {pts}")
    lines += ["", data.get("notes", "")]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="folder holding the four CSVs")
    parser.add_argument("--minutes", type=float, default=15.0, help="training minutes per set and seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--work", type=Path, default=None, help="keep the run folders here (default: a temp folder)")
    parser.add_argument("--report", action="store_true", help="rebuild earth.md from earth.json")
    parser.add_argument(
        "--ema-study",
        choices=list(SETS),
        default=None,
        help="instead: compare EMA settings on a short run of this set (writes earth_ema.{json,md})",
    )
    parser.add_argument("--ema-steps", type=int, default=1000, help="the short run's steps (--ema-study)")
    parser.add_argument(
        "--recipe-study",
        choices=list(SETS),
        default=None,
        help="instead: one change of the recipe at a time at equal steps on this set (earth_recipe.{json,md})",
    )
    parser.add_argument("--recipe-steps", type=int, default=6000, help="the steps of each run (--recipe-study)")
    parser.add_argument("--notes", default="", help="a paragraph appended to the report")
    add_output_options(parser)
    args = parser.parse_args()
    out = output_dir(parser, args)
    if args.report:
        data = json.loads((out / "earth.json").read_text())
        if args.notes:
            data["notes"] = args.notes
            write_json_atomic(out / "earth.json", data)
        write_text_atomic(out / "earth.md", report(data))
        return
    if args.data is None or not args.data.is_dir():
        parser.error("--data: the folder holding volerup.csv, quakes_all.csv, flood.csv and fire.csv")
    wanted = [s for s in (args.ema_study, args.recipe_study) if s is not None] or args.sets
    missing = [SETS[s] for s in wanted if not (args.data / SETS[s]).is_file()]
    if missing:
        parser.error(f"--data {args.data} lacks {', '.join(missing)}")
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="manifold-fm-earth-"))
    if args.recipe_study is not None:
        study = {"command": command(), **recipe_study(args.recipe_study, args.data / SETS[args.recipe_study],
                                                      args.recipe_steps, work, args.quick)}  # fmt: skip
        write_json_atomic(out / "earth_recipe.json", study)
        write_text_atomic(out / "earth_recipe.md", recipe_report(study))
        print(recipe_report(study))
        return
    if args.ema_study is not None:
        study = {"command": command(), **ema_study(args.ema_study, args.data / SETS[args.ema_study], args.ema_steps,
                                                    work, args.quick)}  # fmt: skip
        write_json_atomic(out / "earth_ema.json", study)
        write_text_atomic(out / "earth_ema.md", ema_report(study))
        print(ema_report(study))
        return
    runs = []
    for name in args.sets:
        for seed in args.seeds:
            row = run_set(name, args.data / SETS[name], args.minutes, seed, work, args.quick)
            runs.append(row)
            print(f"{name} seed {seed}: test NLL {row['test_nll']:.3f} ({row['steps_trained']} steps, "
                  f"{row['wall_seconds']:.0f} s)", flush=True)  # fmt: skip
    data = {
        "command": command(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (1 thread used), "
        f"torch {torch.__version__}",
        "minutes": args.minutes,
        "seeds": args.seeds,
        "recipe": RECIPE,
        "published": PUBLISHED,
        "runs": runs,
        "notes": args.notes,
    }
    write_json_atomic(out / "earth.json", data)
    write_text_atomic(out / "earth.md", report(data))
    print(f"written: {out / 'earth.json'}, {out / 'earth.md'}")


if __name__ == "__main__":
    main()
