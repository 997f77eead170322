"""The built-in evaluation classifier ("the judge" of FD-builtin-classifier and classifier accuracy): train it by its
recipe, ship its weights, and record how well it knows the classes.

    python benchmarks/builtin_judge.py            # train it (1 thread, minutes) -> the shipped weights + results
    python benchmarks/builtin_judge.py --report   # rebuild the Markdown from the saved JSON

Training (:func:`manifold_fm.eval.classifier.train_builtin_classifier` with the default
:class:`~manifold_fm.eval.classifier.JudgeRecipe`) is deterministic for a thread count: it renders its own images
(``BuiltinImages("train", seed=101)``, never the test images it is scored on), mixes in their reconstructions
through the built-in tokenizer, and writes ``manifold_fm/assets/builtin_classifier.safetensors`` (the recipe and
the accuracies in its metadata). The report gives its accuracy on the seed-0 test split (real images and their
reconstructions), per class, and on the seed-1 held-out images the default run's reference row uses, with the
training wall time. Writes ``builtin_judge.json`` and ``builtin_judge.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from manifold_fm.atomic import write_json_atomic, write_text_atomic

from reporting import RESULTS, command, written_by


def train(out: Path) -> dict:
    """Train the judge, save it to ``out``; its info, per-class and held-out accuracies, and the wall time."""
    from manifold_fm.data.builtin_images import CLASS_NAMES, BuiltinImages
    from manifold_fm.eval.classifier import (
        JudgeRecipe,
        load_builtin_classifier,
        predict,
        save_builtin_classifier,
        train_builtin_classifier,
    )

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, info = train_builtin_classifier(JudgeRecipe(), progress=True)
    wall = time.perf_counter() - t0
    save_builtin_classifier(model, info, out)
    model, info = load_builtin_classifier(out)  # what ships is what is scored
    x, y = BuiltinImages("test", per_class=100, seed=0).tensors()
    _, preds = predict(model, x)
    per_class = {name: float((preds[y == c] == c).float().mean()) for c, name in enumerate(CLASS_NAMES)}
    hx, hy = BuiltinImages("test", per_class=50, seed=1).tensors()
    _, hpreds = predict(model, hx)
    return {
        "command": command(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "weights": os.path.relpath(out.resolve(), Path(__file__).resolve().parents[1]),
        "train_wall_s": round(wall, 1),
        "load_avg_end": round(os.getloadavg()[0], 2),
        "info": info,
        "per_class_test_accuracy": per_class,
        "heldout_seed1_accuracy": float((hpreds == hy).float().mean()),
    }


def report(data: dict) -> str:
    info, r = data["info"], data["info"]["recipe"]
    rows = [
        "| images | accuracy |",
        "|---|---|",
        f"| real, test split (seed 0, 100 per class) | {info['test_accuracy']:.3f} |",
        f"| their reconstructions (built-in decoder; spherical projection + that decoder) | "
        f"{info['test_reconstruction_accuracy']:.3f} |",
        f"| real, held-out set of the default run's reference row (seed 1, 50 per class) | "
        f"{data['heldout_seed1_accuracy']:.3f} |",
    ]
    per = ", ".join(f"{k} {v:.2f}" for k, v in data["per_class_test_accuracy"].items())
    return "\n".join(
        [
            "The built-in classifier (the judge of FD-builtin-classifier and classifier accuracy), its accuracy:",
            "",
            *rows,
            "",
            f"Per class (test split): {per}.",
            "",
            f"Recipe: {r['per_class']} rendered images per class of its own (`BuiltinImages('train', "
            f"seed={r['data_seed']})`: never the test images), the first {r['recon_per_class']} per class also "
            f"reconstructed through the built-in tokenizer (its decoder, and the spherical projection with it), "
            f"{r['recon_fraction']:.0%} of each batch from those reconstructions; flips, shifts, blur and noise; "
            f"{r['steps']} AdamW steps of {r['batch_size']} at lr {r['lr']} (one-cycle), width {r['width']} "
            f"({info['feature_dim']}-d features). Trained in {data['train_wall_s']:.0f} s on {info['threads']} "
            f"thread(s), torch {info['torch']} (load average {data['load_avg_end']:.1f} at its end), "
            f"{data['date']}; weights `{data['weights']}`.",
            "",
            written_by(data["command"]),
            "",
        ]
    )


def main() -> None:
    from manifold_fm.eval.classifier import ASSET_PATH

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only rebuild the Markdown from the saved JSON")
    parser.add_argument("--weights", type=Path, default=ASSET_PATH, help="where to write the weights")
    args = parser.parse_args()
    path = RESULTS / "builtin_judge.json"
    if args.report:
        data = json.loads(path.read_text())
    else:
        data = train(args.weights)
        write_json_atomic(path, data)
    write_text_atomic(RESULTS / "builtin_judge.md", report(data))
    print(report(data))


if __name__ == "__main__":
    main()
