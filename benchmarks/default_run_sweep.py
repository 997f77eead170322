"""The sweep behind the default run's settings: both arms (spherical and the linear baseline) trained with the same
candidate settings, each scored with several samplers, and the wall time of the whole run.

Every candidate is a full ``manifold-fm train`` default run (built-in tokenizer, decoder finetune, both arms in
parallel, the built-in classifier's FD and accuracy on 600 samples per arm) with ``--set`` overrides; each trained
arm is then re-sampled with every sampler of ``SAMPLERS`` (same noise, same labels) without retraining. The goal
the default is chosen for (issue 15): within 5 minutes on an idle 2-core machine, the spherical samples' classifier
accuracy at least 80% of the accuracy on reconstructions through the same decoder, with the same budget for the
linear baseline.

    python benchmarks/default_run_sweep.py                 # every candidate, seed 0
    python benchmarks/default_run_sweep.py --only base lr2e-3 --seeds 0 1 2
    python benchmarks/default_run_sweep.py --report        # rebuild the table from the saved results

Writes ``benchmarks/results/default_run_sweep.json`` (every candidate, seed, arm and sampler) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# name -> --set overrides of the default config (the same for both arms)
CANDIDATES: dict[str, list[str]] = {
    "base": [],
    "lr2e-3": ["optim.lr=2e-3"],
    "lr2e-3-logit-normal": ["optim.lr=2e-3", "flow.time=logit_normal"],
    "lr3e-3": ["optim.lr=3e-3"],
    "lr2e-3-logit-normal-steps1600": [
        "optim.lr=2e-3",
        "flow.time=logit_normal",
        "train.steps=1600",
        "train.eval_every=400",
    ],
    "lr2e-3-logit-normal-steps2000": [
        "optim.lr=2e-3",
        "flow.time=logit_normal",
        "train.steps=2000",
        "train.eval_every=500",
    ],
    "lr2e-3-cosine": ["optim.lr=2e-3", "optim.schedule=cosine"],
    # patch 4: 4 tokens of 4 x 4 x 16 instead of 16 of 2 x 2 x 16, a 2.4x cheaper step (same width) ...
    "micro4-lr2e-3-steps3000": [
        "model.arch=SiT-Micro/4",
        "optim.lr=2e-3",
        "train.steps=3000",
        "train.eval_every=750",
    ],
    # ... or a 5.8x wider model at 1.4x the step of SiT-Micro/2
    "tiny4-lr2e-3": ["model.arch=SiT-Tiny/4", "optim.lr=2e-3"],
}
# name -> sampler overrides (sample section) scored on every trained arm
SAMPLERS: dict[str, dict[str, object]] = {
    "euler20": {"method": "euler", "steps": 20, "cfg_scale": 1.0},
    "euler20-cfg1.5": {"method": "euler", "steps": 20, "cfg_scale": 1.5},
    "euler20-cfg2": {"method": "euler", "steps": 20, "cfg_scale": 2.0},
    "euler20-cfg3": {"method": "euler", "steps": 20, "cfg_scale": 3.0},
    "euler20-cfg4": {"method": "euler", "steps": 20, "cfg_scale": 4.0},
    "heun10-cfg3": {"method": "heun", "steps": 10, "cfg_scale": 3.0},
}
ARMS = ("spherical", "linear")


def rescore(run_dir: Path, seed: int, num_samples: int, cache_dir: Path | None) -> dict[str, dict[str, float]]:
    """Every sampler of :data:`SAMPLERS` on the trained arms of one default run (the run's final evaluation noise)."""
    import torch

    from manifold_fm.config import validate
    from manifold_fm.eval.classifier import builtin_evaluator
    from manifold_fm.eval.sample_quality import SampleQuality
    from manifold_fm.sampler import SamplerSpec
    from manifold_fm.training.runs import load_run

    torch.set_num_threads(1)
    evaluator = builtin_evaluator(cache_dir, progress=False)
    out: dict[str, dict[str, float]] = {}
    for arm in ARMS:
        run = load_run(run_dir / arm)
        for name, sampler in SAMPLERS.items():
            spec = validate(
                SamplerSpec, {**run.cfg.sample.model_dump(include=set(SamplerSpec.model_fields)), **sampler}
            )
            quality = SampleQuality(run.flow, spec, run.decoder, run.latent_shape, run.num_classes, evaluator)
            r = quality(run.model, num_samples, seed=seed + 2)  # the default run's final-evaluation noise
            out[f"{arm}/{name}"] = {k: r[k] for k in ("fd_builtin_classifier", "classifier_accuracy")}
    return out


def run_candidate(name: str, seed: int, work: Path, cache_dir: Path | None) -> dict:
    from manifold_fm.training.default_run import run_default

    out = work / f"{name}-seed{seed}"
    overrides = [*CANDIDATES[name], f"train.seed={seed}"]
    if cache_dir is not None:
        overrides.append(f"tokenizer.cache_dir={cache_dir}")
    t0 = time.perf_counter()
    run_default(None, overrides, out, progress=False, echo=lambda *a: None)
    wall = time.perf_counter() - t0
    results = json.loads((out / "results.json").read_text())
    refs = results["references"]
    return {
        "candidate": name,
        "seed": seed,
        "overrides": overrides,
        "wall_s": round(wall, 1),
        "total_s": results["total_s"],
        "timings_s": results["timings_s"],
        "arms": {
            arm: {
                k: results["modes"][arm][k]
                for k in ("fd_builtin_classifier", "classifier_accuracy", "train_s", "final_loss")
            }
            for arm in ARMS
        },
        "reconstruction_accuracy": {
            "spherical": refs["reconstructions (spherical, finetuned decoder)"]["classifier_accuracy"],
            "linear": refs["reconstructions (base decoder)"]["classifier_accuracy"],
        },
        "samplers": rescore(out, seed, results["config"]["eval"]["num_samples"], cache_dir),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| candidate | seeds | sampler | spherical FD | spherical acc | (of recon) | linear FD | linear acc | "
        "(of recon) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_name: dict[str, list[dict]] = {}
    for r in rows:
        by_name.setdefault(r["candidate"], []).append(r)
    for name, group in by_name.items():
        for sampler in SAMPLERS:

            def mean(arm: str, key: str, group: list[dict] = group, sampler: str = sampler) -> float:
                return statistics.mean(g["samplers"][f"{arm}/{sampler}"][key] for g in group)

            def share(arm: str, group: list[dict] = group, sampler: str = sampler) -> float:
                return statistics.mean(
                    g["samplers"][f"{arm}/{sampler}"]["classifier_accuracy"] / g["reconstruction_accuracy"][arm]
                    for g in group
                )

            wall = statistics.mean(g["wall_s"] for g in group)
            lines.append(
                f"| {name} | {len(group)} | {sampler} | {mean('spherical', 'fd_builtin_classifier'):.2f} | "
                f"{mean('spherical', 'classifier_accuracy'):.3f} | {share('spherical'):.0%} | "
                f"{mean('linear', 'fd_builtin_classifier'):.2f} | {mean('linear', 'classifier_accuracy'):.3f} | "
                f"{share('linear'):.0%} | {wall:.0f} |"
            )
    lines += [
        "",
        "FD-builtin-classifier (lower is better) and the built-in classifier's accuracy on 600 class-balanced "
        "samples per arm (mean over the seeds); '(of recon)' is that accuracy over the accuracy on held-out "
        "reconstructions through the arm's decoder. Wall time: the whole default run (both arms in parallel) "
        "on the machine that ran the sweep. Written by `python benchmarks/default_run_sweep.py`.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--work", type=Path, default=Path("runs/sweep"), help="where the runs go (kept)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--report", action="store_true", help="only rebuild the table from the saved results")
    args = parser.parse_args()
    path = RESULTS / "default_run_sweep.json"
    rows: list[dict] = json.loads(path.read_text())["rows"] if path.is_file() else []
    if not args.report:
        sys.path.insert(0, str(ROOT))
        from manifold_fm.atomic import write_json_atomic

        for name in args.only:
            for seed in args.seeds:
                row = run_candidate(name, seed, args.work, args.cache_dir)
                if path.is_file():  # re-read: another sweep process may have added rows meanwhile
                    rows = json.loads(path.read_text())["rows"]
                rows = [r for r in rows if (r["candidate"], r["seed"]) != (name, seed)] + [row]
                write_json_atomic(path, {"rows": rows})  # after every run: a stopped sweep keeps what it did
                print(f"{name} seed {seed}: {row['wall_s']:.0f} s", flush=True)
    from manifold_fm.atomic import write_text_atomic

    write_text_atomic(RESULTS / "default_run_sweep.md", table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
