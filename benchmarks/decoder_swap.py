"""The decoder-swap control on the built-in proxy: each arm's generated latents decoded through every decoder.

The spherical arms decode with a decoder finetuned on projected latents; the vanilla arms with the tokenizer's own.
If the spherical arm were ahead only because its decoder is better, the linear arm's samples would gain as much from
that decoder. So every arm's final samples (the same noise and labels per arm, the run's sampler) are decoded three
ways and scored by the built-in classifier:

- *own*: the arm's decoder (what the run reports);
- *base decoder, projected*: the raw latents projected to radius ``sqrt(d)`` per token, then the tokenizer's own
  decoder (:class:`~manifold_fm.tokenizers.SphericalTokenizer` without a finetuned state);
- *finetuned decoder, projected*: the same projected raw latents through the finetuned spherical decoder.

Raw latents are the arm's latents with the training normalisation undone (vanilla arms) or as generated (spherical
arms: already projected raw latents). The models are the ablation's (``benchmarks/ablation.py``).

    python benchmarks/decoder_swap.py           # runs/ablation, seeds 0 1 2 -> results/decoder_swap.{json,md}
    python benchmarks/decoder_swap.py --report  # rebuild the table from the saved json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from reporting import NOISE_OFFSETS, map_in_processes, mean_sd

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
METRIC = "fd_builtin_classifier"
DECODERS = ("own", "base decoder, projected", "finetuned decoder, projected")


def score(job: tuple[str, str, int, int]) -> dict[str, Any]:
    """One arm of one seed: its samples through every decoder of :data:`DECODERS`."""
    run_dir, arm, seed, samples = job
    import torch

    torch.set_num_threads(1)
    from manifold_fm.eval.classifier import builtin_evaluator
    from manifold_fm.eval.sample_quality import SampleQuality
    from manifold_fm.tokenizers import SphericalTokenizer
    from manifold_fm.training.runs import load_run

    run = load_run(Path(run_dir))
    evaluator = builtin_evaluator()
    spec = run.cfg.sample
    quality = SampleQuality(run.flow, spec, run.decoder, run.latent_shape, run.num_classes, evaluator)
    z, own_images, labels, _ = quality.sample(run.model, samples, seed=NOISE_OFFSETS["decoder_swap"] + seed)
    spherical_latent = run.cfg.flow.resolved["latent"] == "spherical"
    base = run.decoder.base if spherical_latent else run.decoder  # the run's own tokenizer: loaded once
    raw = z if spherical_latent else run.decoder.normalization.denormalize(z)
    state = Path(run_dir).parent / "spherical_decoder.safetensors"  # the default run's finetuned decoder
    plain, finetuned = SphericalTokenizer(base).eval(), SphericalTokenizer(base, decoder_state=state).eval()
    projected = plain.project(raw)
    out: dict[str, Any] = {"arm": arm, "seed": seed, "decoders": {}}
    with torch.no_grad():
        images = {
            "own": own_images,
            "base decoder, projected": plain.decode(projected),
            "finetuned decoder, projected": finetuned.decode(projected),
        }
    for name, imgs in images.items():
        r = evaluator.evaluate(imgs, labels)
        out["decoders"][name] = {METRIC: r[METRIC], "classifier_accuracy": r["classifier_accuracy"]}
    return out


def table(rows: list[dict], arms: list[str], command: str) -> str:
    lines = [
        "| arm | " + " | ".join(f"{d}: FD / acc" for d in DECODERS) + " |",
        "|---|" + "---|" * len(DECODERS),
    ]
    for arm in arms:
        cells = []
        for d in DECODERS:
            fd = [r["decoders"][d][METRIC] for r in rows if r["arm"] == arm]
            acc = [r["decoders"][d]["classifier_accuracy"] for r in rows if r["arm"] == arm]
            m, sd = mean_sd(fd)
            cells.append(f"{m:.2f} ± {sd:.2f} / {statistics.mean(acc):.3f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in rows})
    lines += [
        "",
        f"Mean ± sample standard deviation of FD-builtin-classifier (lower is better) / mean classifier accuracy over "
        f"the models of seeds {', '.join(map(str, seeds))}; each arm's final samples (its run's sampler, the same "
        "noise and labels for the three decoders) decoded by its own decoder, and as projected raw latents by the "
        "base decoder and by the decoder finetuned on projected latents.",
        "",
        f"Written by `{command}`.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/ablation"), help="seed<N>/<arm> run folders")
    parser.add_argument("--arms", nargs="+", default=["linear", "shell", "spherical-linear", "spherical"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=600, help="samples per arm and seed")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only rebuild the table from the saved json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from manifold_fm.atomic import write_json_atomic, write_text_atomic

    command = (
        f"python benchmarks/decoder_swap.py --runs {args.runs} --arms {' '.join(args.arms)} "
        f"--seeds {' '.join(map(str, args.seeds))} --samples {args.samples}"
    )
    if args.report:
        saved = json.loads((RESULTS / "decoder_swap.json").read_text())
        rows, command = saved["rows"], saved["command"]
    else:
        jobs = [
            (str(args.runs / f"seed{seed}" / arm), arm, seed, args.samples) for seed in args.seeds for arm in args.arms
        ]
        rows = map_in_processes(__file__, "score", jobs, args.processes)
        write_json_atomic(RESULTS / "decoder_swap.json", {"command": command, "rows": rows})
    text = table(rows, args.arms, command)
    write_text_atomic(RESULTS / "decoder_swap.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
