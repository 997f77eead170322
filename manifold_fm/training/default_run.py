"""The built-in default run: ``manifold-fm train`` with no arguments runs the whole method at small scale on a CPU.

1. the built-in tiny VAE (shipped weights, or trained once and cached) and the built-in 12-class images;
2. spherical projection of its latents and a decoder finetune on projected latents (encoder frozen);
3. a tiny SiT trained with spherical flow matching (TokenSpheres prior, slerp path, tangent loss, exp-map sampler)
   and, with the same steps, batch, optimiser and seed, the linear baseline (Gaussian prior, straight path, the
   tokenizer's own per-channel normalisation);
4. samples from both (EMA weights), scored with the **FD-builtin-classifier** (Fréchet distance in a small built-in
   classifier's features against the held-out test split — not FID), that classifier's accuracy on the requested
   classes, the on-sphere error of the generated tokens ``max | |z| / sqrt(d) - 1 |`` and wall times; the same
   metrics over training steps.

Reference rows put the numbers in context: held-out real images (the floor) and tokenizer reconstructions of them
(what a perfect generator could reach through each decoder). Writes ``results.json``, ``results.md``,
``<mode>/grid.png``, ``reconstructions.png`` and ``metrics_over_steps.png`` into the output folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..atomic import atomic_path, write_text_atomic
from ..config import load_config, save_config, to_dict


@dataclass
class DefaultRunConfig:
    """Settings of the default run (``manifold_fm/configs/default.yaml``); see that file for what each means."""

    kind: Literal["default"] = "default"
    seed: int = 0
    threads: int | None = 1
    per_class: int = 300
    test_per_class: int = 100
    finetune_steps: int = 200
    finetune_batch_size: int = 16
    arch: str = "SiT-Micro/2"
    time_scale: float = 1000.0
    steps: int = 1200
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    ema_decay: float = 0.995
    class_dropout: float = 0.1
    sample_method: str = "euler"
    sample_steps: int = 20
    cfg_scale: float = 1.0
    num_samples: int = 600
    eval_every: int | None = 300
    eval_samples: int = 240
    classifier_steps: int = 800
    modes: list[str] = field(default_factory=lambda: ["spherical", "linear"])
    parallel: bool = True
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        from ..config import ConfigError

        bad = [m for m in self.modes if m not in ("spherical", "linear")]
        if bad or not self.modes:
            raise ConfigError(f"modes: must be a non-empty list of spherical/linear, got {self.modes}")
        for key in ("per_class", "test_per_class", "steps", "batch_size", "num_samples", "eval_samples"):
            if getattr(self, key) < 2:
                raise ConfigError(f"{key}: must be >= 2, got {getattr(self, key)}")


def image_run_config(cfg: DefaultRunConfig, mode: str, decoder_state: Path | None) -> dict[str, Any]:
    """The :class:`~manifold_fm.training.image_config.ImageRunConfig` mapping of one mode of the default run."""
    return {
        "kind": "image",
        "name": f"default-{mode}",
        "model": {"arch": cfg.arch, "time_scale": cfg.time_scale},
        "tokenizer": {"kind": "builtin", "cache_dir": None if cfg.cache_dir is None else str(cfg.cache_dir),
                      "decoder_state": str(decoder_state) if (mode == "spherical" and decoder_state) else None},
        "data": {"source": "builtin", "per_class": cfg.per_class, "seed": 0},
        "flow": {"mode": mode},
        "optim": {"lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "grad_clip": 1.0},
        "train": {"steps": cfg.steps, "batch_size": cfg.batch_size, "seed": cfg.seed,
                  "class_dropout": cfg.class_dropout, "ema_decay": cfg.ema_decay, "checkpoint_every": cfg.steps,
                  "keep_checkpoints": 1, "log_every": max(1, min(25, cfg.steps // 4)),
                  "eval_every": cfg.eval_every, "mixed_precision": "no"},
        "sample": {"method": cfg.sample_method, "steps": cfg.sample_steps, "cfg_scale": cfg.cfg_scale,
                   "seed": cfg.seed},
    }


def token_norm_error(latents: Tensor) -> dict[str, float]:
    """``| |z| / sqrt(d) - 1 |`` over every token (channel axis 1): max and mean."""
    err = (torch.linalg.vector_norm(latents.double(), dim=1) / latents.shape[1] ** 0.5 - 1).abs()
    return {"max": float(err.max()), "mean": float(err.mean())}


class _Evaluator:
    """Samples a model with fixed noise/labels, decodes and scores the images (FD, accuracy, on-sphere error)."""

    def __init__(self, cfg: DefaultRunConfig, flow: Any, decoder: Any, shape: tuple[int, int, int],
                 num_classes: int, builtin: Any) -> None:
        from ..eval.sampling import SamplerSpec

        self.cfg, self.flow, self.decoder, self.shape = cfg, flow, decoder, shape
        self.num_classes, self.builtin = num_classes, builtin
        self.spec = SamplerSpec(method=cfg.sample_method, steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale)

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor, float]:
        from ..eval.sampling import balanced_labels, generate_latents

        labels = balanced_labels(n, self.num_classes)
        t0 = time.perf_counter()
        z = generate_latents(model, self.flow, labels, self.shape, self.spec, seed=seed, null_class=self.num_classes)
        images = self.decoder.decode(z).float()
        return z, images, labels, time.perf_counter() - t0

    def __call__(self, model: nn.Module, n: int, seed: int) -> dict[str, float]:
        z, images, labels, secs = self.sample(model, n, seed)
        out = self.builtin.evaluate(images, labels)
        err = token_norm_error(z)
        out.update({"on_sphere_error_max": err["max"], "on_sphere_error_mean": err["mean"],
                    "sample_s_per_image": secs / n})
        return out


def _train_mode(job: tuple[Any, ...]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train, sample and score one mode of the default run (top-level so a worker process can run it)."""
    from ..eval.sampling import save_image_grid
    from ..models.sit import build_sit
    from .image_config import load_image_config
    from .logging import read_jsonl
    from .trainer import FlowTrainer, TensorLatents, flow_from_config

    cfg, mode, decoder_path, latents, labels, decoder, builtin, out, progress, tokenizer_name, position = job
    # what `manifold-fm sample` decodes with (see training.image.run_decoder)
    latent_norm = decoder.normalization.to_dict()
    if cfg.parallel:
        torch.set_num_threads(1)
    channels, side = latents.shape[1], latents.shape[-1]
    num_classes = builtin.model.num_classes
    icfg = load_image_config(image_run_config(cfg, mode, decoder_path))
    flow = flow_from_config(icfg, channels)
    evaluator = _Evaluator(cfg, flow, decoder, (channels, side, side), num_classes, builtin)
    torch.manual_seed(cfg.seed)
    model = build_sit(cfg.arch, input_size=side, in_channels=channels, num_classes=num_classes,
                      time_scale=cfg.time_scale)

    def on_eval(step: int, ema_model: nn.Module) -> dict[str, float]:
        if step == cfg.steps:
            return {}  # the final evaluation below uses more samples
        return evaluator(ema_model, cfg.eval_samples, seed=cfg.seed + 1)

    run_dir = out / mode
    t0 = time.perf_counter()
    trainer = FlowTrainer(model, flow, TensorLatents(latents, labels), icfg, run_dir, null_class=num_classes,
                          device="cpu", on_eval=on_eval if cfg.eval_every else None, progress=progress,
                          progress_position=position,
                          meta={"latent_shape": [channels, side, side], "num_classes": num_classes,
                                "tokenizer": tokenizer_name, "latent_normalization": latent_norm})
    trainer.fit()
    train_s = time.perf_counter() - t0
    t_eval = time.perf_counter()
    ema = trainer.ema.model
    final = evaluator(ema, cfg.num_samples, seed=cfg.seed + 2)
    _, images, _, _ = evaluator.sample(ema, num_classes * 8, seed=cfg.seed + 3)
    order = torch.arange(num_classes * 8).view(8, num_classes).T.reshape(-1)  # one row per class
    save_image_grid(images[order], run_dir / "grid.png", nrow=8)
    final.update({"train_s": train_s, "eval_s": time.perf_counter() - t_eval, "final_loss": trainer.last_loss,
                  "steps": cfg.steps, "threads": torch.get_num_threads()})
    records = read_jsonl(run_dir / "metrics.jsonl")
    records.append({"step": cfg.steps, **{k: final[k] for k in ("fd_builtin_classifier", "classifier_accuracy")}})
    return final, records




def format_table(results: dict[str, Any]) -> str:
    """The summary table (Markdown) of a default run's ``results``."""
    lines = [
        "| run | FD-builtin-classifier ↓ | classifier accuracy ↑ | on-sphere error (max) | train wall time | "
        "sampling s/image |",
        "|---|---|---|---|---|---|",
    ]
    for mode, r in results["modes"].items():
        ose = f"{r['on_sphere_error_max']:.1e}" if mode == "spherical" else f"({r['on_sphere_error_max']:.2f})"
        lines.append(f"| {mode} | {r['fd_builtin_classifier']:.3f} | {r['classifier_accuracy']:.3f} | {ose} | "
                     f"{r['train_s']:.0f} s | {r['sample_s_per_image'] * 1e3:.1f} ms |")
    for name, r in results["references"].items():
        acc = f"{r['classifier_accuracy']:.3f}" if "classifier_accuracy" in r else "-"
        lines.append(f"| {name} | {r['fd_builtin_classifier']:.3f} | {acc} | - | - | - |")
    return "\n".join(lines)


def plot_over_steps(history: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """FD, accuracy and loss against training step, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for mode, records in history.items():
        ev = [r for r in records if "fd_builtin_classifier" in r]
        loss = [r for r in records if "loss" in r]
        axes[0].plot([r["step"] for r in ev], [r["fd_builtin_classifier"] for r in ev], "o-", label=mode)
        axes[1].plot([r["step"] for r in ev], [r["classifier_accuracy"] for r in ev], "o-", label=mode)
        axes[2].plot([r["step"] for r in loss], [r["loss"] for r in loss], label=mode)
    for ax, title in zip(axes, ["FD-builtin-classifier (lower is better)", "classifier accuracy",
                                "flow-matching loss (not comparable across modes)"], strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def translate_default_overrides(overrides: Sequence[str]) -> list[str]:
    """``train``'s shortcuts for the default run: ``train.steps=N`` -> ``steps=N``; ``path=linear|geodesic`` ->
    only that mode."""
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key == "train.steps":
            item = f"steps={value}"
        elif key == "path":
            item = f"modes=[{ {'geodesic': 'spherical'}.get(value, value) }]"
        out.append(item)
    return out


def run_default(out_dir: str | Path | None = None, overrides: Sequence[str] = (), *, progress: bool = True,
                echo: Any = print) -> Path:
    """Run the default pipeline (see the module docstring); returns the output folder."""
    from ..data.images import BuiltinImages
    from ..eval.classifier import builtin_evaluator
    from ..eval.sampling import save_image_grid
    from ..tokenizers import SphericalTokenizer, builtin_tokenizer
    from ..tokenizers.finetune import finetune_decoder
    from .image import encode_dataset

    cfg = load_config(DefaultRunConfig, "default", translate_default_overrides(overrides))
    out = Path(out_dir) if out_dir is not None else Path("runs") / "default"
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 2)
        echo(f"[{time.perf_counter() - t_start:6.1f} s] {name}: {timings[name]:.1f} s")

    # 1. tokenizer and data (rendered once, shared by every stage)
    t0 = time.perf_counter()
    tokenizer = builtin_tokenizer(cfg.cache_dir, progress=progress).eval()
    train_ds = BuiltinImages("train", per_class=cfg.per_class, seed=0)
    test_ds = BuiltinImages("test", per_class=cfg.test_per_class, seed=0)
    train_x, train_y = train_ds.tensors()
    test_x, test_y = test_ds.tensors()
    num_classes = train_ds.num_classes
    lap("tokenizer + data", t0)

    t0 = time.perf_counter()
    builtin = builtin_evaluator(cfg.cache_dir, progress=progress, per_class=cfg.per_class,
                                test_per_class=cfg.test_per_class, steps=cfg.classifier_steps,
                                train_data=(train_x, train_y), test_data=(test_x, test_y))
    lap("built-in classifier", t0)

    # 2. spherical projection + decoder finetune
    decoder_path: Path | None = None
    finetune_report: dict[str, Any] = {}
    if "spherical" in cfg.modes:
        t0 = time.perf_counter()
        from safetensors.torch import save_file
        from torch.utils.data import TensorDataset

        state, finetune_report = finetune_decoder(
            tokenizer, TensorDataset(train_x, train_y), cfg.finetune_steps, batch_size=cfg.finetune_batch_size,
            project=True, eval_dataset=TensorDataset(test_x, test_y), seed=cfg.seed, progress=progress,
        )
        # absolute, so the runs' saved configs find it from any working directory
        decoder_path = (out / "spherical_decoder.safetensors").resolve()
        with atomic_path(decoder_path) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        lap("decoder finetune", t0)

    # 3. latents: the linear baseline trains on the tokenizer's normalised latents; spherical mode on the raw encoder
    #    output, which the trainer projects: exactly what the finetuned decoder saw (SphericalTokenizer.encode)
    t0 = time.perf_counter()
    latents = {mode: encode_dataset(tokenizer, train_x, progress=progress, raw=mode == "spherical")
               for mode in cfg.modes}
    lap("encode latents", t0)

    # Reference rows: a second held-out set (different seed) and its reconstructions through each decoder.
    t0 = time.perf_counter()
    refs: dict[str, dict[str, float]] = {}
    ref_x, ref_y = BuiltinImages("test", per_class=max(2, cfg.num_samples // num_classes), seed=1).tensors()
    refs["real held-out images"] = builtin.evaluate(ref_x, ref_y)
    decoders: dict[str, Any] = {"linear": tokenizer}
    with torch.no_grad():
        refs["reconstructions (base decoder)"] = builtin.evaluate(tokenizer.decode(tokenizer.encode(ref_x)), ref_y)
        recon_rows = [ref_x[:12], tokenizer.decode(tokenizer.encode(ref_x[:12]))]
        if "spherical" in cfg.modes:
            sph = SphericalTokenizer(tokenizer, decoder_state=decoder_path).eval()
            decoders["spherical"] = sph
            rec = sph.decode(sph.encode(ref_x))
            refs["reconstructions (spherical, finetuned decoder)"] = builtin.evaluate(rec, ref_y)
            plain = SphericalTokenizer(tokenizer).eval()
            refs["reconstructions (spherical, base decoder)"] = builtin.evaluate(plain.decode(plain.encode(ref_x)),
                                                                                 ref_y)
            recon_rows.append(rec[:12])
    save_image_grid(torch.cat(recon_rows), out / "reconstructions.png", nrow=12)
    lap("reference metrics", t0)

    # 4. train both modes with the same budget and seed, evaluating over steps; with `parallel` each mode trains in
    #    its own process on one thread (the two runs are independent, so two cores finish both in the time of one).
    results: dict[str, Any] = {"modes": {}, "references": refs}
    history: dict[str, list[dict[str, Any]]] = {}
    # In parallel mode each process draws its own progress bar on its own line.
    jobs = [(cfg, mode, decoder_path, latents[mode], train_y, decoders[mode], builtin, out, progress,
             tokenizer.name, i if cfg.parallel else 0) for i, mode in enumerate(cfg.modes)]
    t0 = time.perf_counter()
    if cfg.parallel and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        echo(f"training {', '.join(cfg.modes)} in parallel ({len(jobs)} processes, 1 thread each)...")
        with ProcessPoolExecutor(max_workers=len(jobs), mp_context=mp.get_context("spawn")) as pool:
            outcomes = list(pool.map(_train_mode, jobs))
    else:
        outcomes = [_train_mode(job) for job in jobs]
    for mode, (final, records) in zip(cfg.modes, outcomes, strict=True):
        results["modes"][mode] = final
        history[mode] = records
    lap(f"train {cfg.steps} steps x {len(jobs)} modes + evaluate", t0)

    plot_over_steps(history, out / "metrics_over_steps.png")
    results["finetune"] = finetune_report
    results["classifier"] = builtin.info
    results["timings_s"] = timings
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    results["config"] = to_dict(cfg)
    results["threads"] = torch.get_num_threads()
    table = format_table(results)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, default=str))
    write_text_atomic(out / "results.md", table + f"\n\nTotal wall time: {results['total_s']:.0f} s "
                f"({torch.get_num_threads()} threads).\n")
    echo("")
    echo(table)
    echo(f"\ntotal wall time {results['total_s']:.0f} s; results, grids and plot in {out}")
    return out
