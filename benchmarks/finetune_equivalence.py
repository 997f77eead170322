"""The decoder finetune of the built-in default run, before and after it moved onto the one trainer (issue 19).

The move changed the order images are drawn (a per-epoch permutation, :class:`~manifold_fm.data.sources.StepIndexer`,
instead of draws with replacement), so the finetuned decoder is not bitwise the old one. This script measures that
the results are the same to seed noise: for each seed it runs the default run's finetune (``finetune.steps`` at
``finetune.batch_size`` on the built-in training images, its pinned recipe: the small ``patch`` discriminator from
half-way, a warm-up over a tenth of the steps, GAN weight 0.1, clipping at 1) with ``train.seed`` = that seed, and
scores the finetuned decoder on projected latents of the whole held-out test split (PSNR, SSIM, the named perceptual
distance; :func:`~manifold_fm.tokenizers.finetune.compare_decoders`).

Its rows are labelled by the code they ran on: ``--label before`` on the package at the commit before the move (the
finetune loop of ``tokenizers/finetune.py``, called as that commit's default run called it), ``--label after`` on
the current one (:func:`~manifold_fm.training.decoder_finetune.finetune_decoder` with
:func:`~manifold_fm.training.schema.default_finetune_config`). Each run adds its rows to the JSON and rewrites the
table: mean and sample standard deviation over seeds per label, and the difference of the means in units of the
pooled seed spread.

    # the package before the move, this script from here:
    git archive c66244f manifold_fm | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before python benchmarks/finetune_equivalence.py --label before
    python benchmarks/finetune_equivalence.py --label after   # -> results/finetune_equivalence.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from reporting import RESULTS, mean_sd, written_by

METRICS = ("psnr", "ssim", "perceptual")


def finetune_and_score(seed: int, cache_dir: str | None) -> dict[str, Any]:
    """One seed: the default run's decoder finetune with ``train.seed = seed``, scored on the held-out test split."""
    import time

    import torch
    from torch.utils.data import TensorDataset

    torch.set_num_threads(1)
    from manifold_fm.data.builtin_images import BuiltinImages
    from manifold_fm.tokenizers import builtin_tokenizer
    from manifold_fm.tokenizers.finetune import compare_decoders
    from manifold_fm.training.schema import load_run_config

    cfg = load_run_config("default", [f"train.seed={seed}"], kind="default")
    tok = builtin_tokenizer(cache_dir, progress=False).eval()
    train_x, train_y = BuiltinImages("train", per_class=cfg.data.per_class, seed=0).tensors()
    test = BuiltinImages("test", per_class=cfg.data.test_per_class, seed=0)
    data = TensorDataset(train_x, train_y)
    t0 = time.perf_counter()
    try:
        from manifold_fm.training.decoder_finetune import finetune_decoder
        from manifold_fm.training.schema import default_finetune_config
    except ImportError:  # the package before the move: its loop, called with the default run's recipe
        from manifold_fm.tokenizers.finetune import finetune_decoder as old_finetune

        steps = cfg.finetune.steps
        state, _ = old_finetune(
            tok,
            data,
            steps,
            batch_size=cfg.finetune.batch_size,
            project=True,
            discriminator="patch",
            gan_weight=0.1,
            gan_start=steps // 2,
            gan_warmup=max(1, steps // 10),
            grad_clip=1.0,
            disc_loss_scale=1.0,
            eval_items=0,
            seed=seed,
            progress=False,
        )
        code = "before"
    else:
        state = finetune_decoder(
            tok, data, default_finetune_config(cfg), eval_items=0, device="cpu", progress=False
        ).decoder_state
        code = "after"
    seconds = time.perf_counter() - t0
    cmp = compare_decoders(tok, {"original": None, "spherical": state}, test, list(range(len(test))))
    return {
        "seed": seed,
        "code": code,
        "finetune_seconds": round(seconds, 1),
        "held_out_images": cmp["images"],
        "perceptual_metric": cmp["perceptual_metric"],
        "finetuned": cmp["metrics"]["spherical_decoder/projected_latents"],
        "base_decoder_projected": cmp["metrics"]["original_decoder/projected_latents"],
    }


def table(results: dict[str, Any]) -> str:
    rows = results["rows"]
    labels = [k for k in ("before", "after") if any(r["label"] == k for r in rows)]
    lines = [
        "# Decoder finetune of the default run, before and after the one trainer",
        "",
        f"Held-out: the built-in test split ({rows[0]['held_out_images']} images), finetuned decoder on projected "
        f"latents; perceptual distance: `{rows[0]['perceptual_metric']}`. Mean +- sample sd over seeds "
        f"{sorted({r['seed'] for r in rows})}; the difference of the means is also given in units of the pooled "
        "seed sd, with Welch's t-test of after against before (t and its two-sided p).",
        "",
        "| metric | "
        + " | ".join(labels)
        + (" | after - before | in pooled sd | Welch t (p) |" if len(labels) == 2 else ""),
        "|---|" + "---|" * (len(labels) + (3 if len(labels) == 2 else 0)),
    ]
    for metric in METRICS:
        stats = {k: mean_sd([r["finetuned"][metric] for r in rows if r["label"] == k]) for k in labels}
        cells = [f"{m:.4f} +- {sd:.4f}" for m, sd in stats.values()]
        if len(labels) == 2:
            from scipy.stats import ttest_ind

            diff = stats["after"][0] - stats["before"][0]
            pooled = statistics.fmean([stats["before"][1] ** 2, stats["after"][1] ** 2]) ** 0.5
            by = {k: [r["finetuned"][metric] for r in rows if r["label"] == k] for k in labels}
            welch = ttest_ind(by["after"], by["before"], equal_var=False)
            cells += [
                f"{diff:+.4f}",
                f"{diff / pooled:+.2f}" if pooled > 0 else "-",
                f"{welch.statistic:+.2f} ({welch.pvalue:.2f})",
            ]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    base = rows[0]["base_decoder_projected"]
    lines += [
        "",
        f"Reference: the base decoder on projected latents, PSNR {base['psnr']:.4f} dB, perceptual "
        f"{base['perceptual']:.4f}.",
        "",
        "| label | seed | PSNR dB | SSIM | perceptual | finetune s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["finetuned"]
        lines.append(
            f"| {r['label']} | {r['seed']} | {f['psnr']:.4f} | {f['ssim']:.4f} | {f['perceptual']:.4f} | "
            f"{r['finetune_seconds']} |"
        )
    lines += [
        "",
        "Commands (each adds its label's rows; `before` ran with `PYTHONPATH` on the package at c66244f):",
        "",
    ]
    lines += [f"- `{c}`" for c in results["commands"]]
    lines += ["", written_by(results["commands"][-1])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", choices=["before", "after"], default="after")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache-dir", default=None, help="the built-in tokenizer's cache (default: its own)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="rebuild the table from the saved JSON only")
    args = parser.parse_args(argv)
    from manifold_fm.atomic import write_json_atomic, write_text_atomic

    from reporting import command

    path = args.out / "finetune_equivalence.json"
    results = json.loads(path.read_text()) if path.is_file() else {"rows": [], "commands": []}
    if args.report:
        write_text_atomic(args.out / "finetune_equivalence.md", table(results))
        print(table(results))
        return
    results["rows"] = [r for r in results["rows"] if r["label"] != args.label]
    for seed in args.seeds:
        row = finetune_and_score(seed, args.cache_dir)
        if row["code"] != args.label:
            sys.exit(f"--label {args.label}, but the package on the path is the one {row['code']} the move")
        results["rows"].append({"label": args.label, **row})
        print(json.dumps(results["rows"][-1]), flush=True)
    results["rows"].sort(key=lambda r: (r["label"] != "before", r["seed"]))
    results["commands"] = [c for c in results["commands"] if f"--label {args.label}" not in c] + [command()]
    results["command"] = results["commands"][-1]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, results, indent=1)
    write_text_atomic(args.out / "finetune_equivalence.md", table(results))
    print(table(results))


if __name__ == "__main__":
    main()
