"""The built-in default run: ``manifold-fm train`` with no arguments runs the whole method at small scale on a CPU.

1. the built-in tiny VAE (shipped weights, or trained once and cached) and the built-in 12-class images;
2. spherical projection of its latents and a decoder finetune on projected latents (encoder frozen), on the one
   trainer (:func:`~manifold_fm.training.decoder_finetune.finetune_decoder`, run folder ``decoder_finetune/``);
3. a tiny SiT trained with spherical flow matching (TokenSpheres prior, slerp path, tangent loss, exp-map sampler)
   and, with the same steps, batch, optimiser and seed, the linear baseline (Gaussian prior, straight path, the
   tokenizer's own per-channel normalisation);
4. samples from both (EMA weights), scored with the **FD-builtin-classifier** (Fréchet distance in a small built-in
   classifier's features against the held-out test split — not FID), that classifier's accuracy on the requested
   classes, the on-sphere error of the generated tokens ``max | |z| / sqrt(d) - 1 |`` and wall times; the same
   metrics over training steps.

Each mode is an image run (:func:`~manifold_fm.training.schema.image_run_config`: the default config's shared
sections with the mode's flow preset) trained by the one :class:`~manifold_fm.training.trainer.Trainer`. Reference
rows put the numbers in context: held-out real images (the floor) and tokenizer reconstructions of them
(what a perfect generator could reach through each decoder). Writes ``results.json``, ``results.md`` (the table
and what each column means), ``<mode>/grid.png`` (a row per class, named), ``reconstructions.png`` (a row per
decoder, named) and ``metrics_over_steps.png`` into the output folder. The modes' run folders record the finetuned
decoder as ``../spherical_decoder.safetensors``, so the folder can be moved or renamed and its modes still sample.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..atomic import atomic_path, write_json_atomic
from ..config import to_dict
from ..data.builtin_images import CLASS_NAMES
from ..data.sources import TensorSource
from ..eval.image_io import save_image_grid
from ..eval.plots import plot_over_steps
from ..eval.sample_quality import SampleQuality
from ..threads import set_threads, using_threads
from .builders import latent_flow
from .default_report import write_report
from .image import eval_hook, image_model, image_trainer
from .metrics_log import read_jsonl
from .run_folder import default_out_dir, replace_run_folder, run_status
from .schema import FLOW_PRESETS, DefaultRunConfig, default_finetune_config, image_run_config, load_run_config
from .trainer import TrainingError

#: ``manifold-fm train --quick``: the default run with every size shrunk (training steps, finetune, training and
#: reference images, evaluation samples) so the same table and pictures come in about a minute on 2 cores; applied
#: before the user's ``--set`` overrides. Its numbers are a smoke run's, not the default run's.
QUICK_OVERRIDES = (
    "name=default-quick",
    "train.steps=240",
    "train.eval_every=120",
    "data.per_class=100",
    "data.test_per_class=25",
    "finetune.steps=30",
    "eval.samples=48",
    "eval.num_samples=96",
)

#: The finetuned decoder of the spherical-latent modes, in the default run's folder (next to the modes' folders).
DECODER_FILE = "spherical_decoder.safetensors"
#: The run folder of the decoder finetune (checkpoints, so a stopped default run resumes it), in the default run's.
FINETUNE_DIR = "decoder_finetune"
#: Added to a mode's ``train.seed`` for the noise and labels of its final evaluation (the table's samples), so a study
#: that re-samples a trained mode with other samplers can use the very same noise.
FINAL_EVAL_NOISE = 2


@dataclass
class ModeJob:
    """One mode of the default run, as handed to a worker process: its config and flow preset, the finetuned
    decoder as the mode's run folder records it (``decoder_path``: relative to that folder), training latents, the
    decoder of its samples, the evaluator, where to write, and whether to resume."""

    cfg: DefaultRunConfig
    mode: str
    decoder_path: Path | None
    latents: Tensor
    labels: Tensor
    decoder: Any
    builtin: Any
    out: Path
    progress: bool
    tokenizer_name: str
    position: int
    resume: bool = False


def _train_mode(job: ModeJob) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train (or resume), sample and score one mode of the default run (top-level so a worker process can run it)."""
    cfg, mode, decoder_path, latents, labels = job.cfg, job.mode, job.decoder_path, job.latents, job.labels
    decoder, builtin, out, progress, tokenizer_name, position = (
        job.decoder,
        job.builtin,
        job.out,
        job.progress,
        job.tokenizer_name,
        job.position,
    )
    # what `manifold-fm sample` decodes with (see training.image.run_decoder)
    latent_norm = decoder.normalization.to_dict()
    if cfg.parallel:
        set_threads(1)  # this worker process is one of several sharing the cores
    channels, side = latents.shape[1], latents.shape[-1]
    num_classes = builtin.model.num_classes
    icfg = image_run_config(cfg, mode, decoder_path)
    flow = latent_flow(icfg.flow, channels)
    quality = SampleQuality(flow, icfg.sample, decoder, (channels, side, side), num_classes, builtin)
    model = image_model(icfg, channels, side, num_classes)
    seed = cfg.train.seed
    # evaluations over training; the final one below uses more samples
    during_training = eval_hook(icfg, flow, decoder, (channels, side, side), num_classes, builtin, cfg.train.steps)

    run_dir = out / mode
    t0 = time.perf_counter()
    trainer = image_trainer(
        icfg,
        model,
        flow,
        TensorSource(latents, labels),
        run_dir,
        shape=(channels, side, side),
        num_classes=num_classes,
        tokenizer_name=tokenizer_name,
        latent_normalization=latent_norm,
        hooks=[during_training],
        device="cpu",
        progress=progress,
        progress_position=position,
    )
    trainer.fit(resume=job.resume)
    train_s = time.perf_counter() - t0
    t_eval = time.perf_counter()
    ema = trainer.ema.model
    final = quality(ema, cfg.eval.num_samples, seed=seed + FINAL_EVAL_NOISE)
    _, images, _, _ = quality.sample(ema, num_classes * 8, seed=seed + 3)
    order = torch.arange(num_classes * 8).view(8, num_classes).T.reshape(-1)  # one row per class
    save_image_grid(
        images[order],
        run_dir / "grid.png",
        nrow=8,
        row_labels=list(CLASS_NAMES[:num_classes]),
        title=f"{mode} (default run, {cfg.train.steps} steps, EMA weights)",
    )
    final.update(
        {
            "train_s": train_s,
            "eval_s": time.perf_counter() - t_eval,
            "final_loss": trainer.last_loss,
            "steps": cfg.train.steps,
            "threads": torch.get_num_threads(),
        }
    )
    records = read_jsonl(run_dir / "metrics.jsonl")
    records.append({"step": cfg.train.steps, **{k: final[k] for k in ("fd_builtin_classifier", "classifier_accuracy")}})
    return final, records


def _check_run_folder(
    out: Path, cfg: DefaultRunConfig, resume: bool, overwrite: bool = False, extend: bool = False
) -> None:
    """Refuse a folder that holds a default run unless resuming (resuming needs the run's own config; ``extend``:
    except ``train.steps``) or overwriting (the folder is deleted here)."""
    if overwrite:
        replace_run_folder(out, resume=resume)
        return
    folders = (FINETUNE_DIR, *cfg.modes)
    done = [p for p in (out / "results.json", *(out / f / "checkpoints" for f in folders)) if p.exists()]
    if not resume:
        if done:
            raise TrainingError(
                f"{out} already holds a default run ({done[0].relative_to(out)}); pass --resume to continue it, "
                "--overwrite to replace it, or choose another --out"
            )
        return
    saved = out / "config.yaml"
    if not saved.is_file():
        raise TrainingError(f"{out} holds no default run to resume (no config.yaml); run without --resume")
    theirs, ours = to_dict(load_run_config(saved, kind="default")), to_dict(cfg)
    if extend:  # the length may change (commands/train.py checks the learning-rate schedule)
        theirs["train"]["steps"] = ours["train"]["steps"]
    changed = sorted(k for k in ours if theirs.get(k) != ours[k])
    if changed:
        raise TrainingError(
            f"cannot resume {out}: config section(s) {', '.join(changed)} differ from its config.yaml; "
            "resume with that config or choose another --out"
        )


def run_default(
    config: DefaultRunConfig | str | Path | None = None,
    overrides: Sequence[str] = (),
    out_dir: str | Path | None = None,
    resume: bool = False,
    *,
    progress: bool = True,
    echo: Any = print,
    overwrite: bool = False,
    extend: bool = False,
) -> Path:
    """Run the default pipeline (see the module docstring) from the built-in ``default`` config (or ``config``)
    with ``overrides``; returns the output folder.

    ``resume``: continue a stopped run in ``out_dir`` (same config): the finetuned decoder is reused and every
    mode's trainer resumes from its latest checkpoint, so the results equal an uninterrupted run's; a finished run
    (its ``results.json`` there) is left as it is, said by ``echo``, unless ``extend`` sets a new ``train.steps``.
    ``overwrite``: delete the run in ``out_dir`` first (once the config has been validated)."""
    from ..config import save_config

    if isinstance(config, DefaultRunConfig) and not overrides:
        cfg = config
    else:
        cfg = load_run_config("default" if config is None else config, overrides, kind="default")
    assert isinstance(cfg, DefaultRunConfig)
    out = Path(out_dir) if out_dir is not None else default_out_dir(cfg)
    _check_run_folder(out, cfg, resume, overwrite, extend)
    status = run_status(out) if resume else None
    if status is not None and status.finished:  # never rewritten (a new length is not finished: results differ)
        echo(status.finished_line())
        return out
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    with using_threads(cfg.train.threads or torch.get_num_threads()):  # train.threads null: keep the count
        return _run_default(cfg, out, resume, progress, echo)


def _run_default(cfg: DefaultRunConfig, out: Path, resume: bool, progress: bool, echo: Any) -> Path:
    """:func:`run_default` once its config is loaded and its folder prepared."""
    from ..data.builtin_images import BuiltinImages
    from ..eval.classifier import builtin_evaluator
    from ..tokenizers import SphericalTokenizer, builtin_tokenizer
    from .decoder_finetune import finetune_decoder
    from .image import encode_dataset

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    cache_dir = cfg.tokenizer.cache_dir
    spherical_modes = [m for m in cfg.modes if FLOW_PRESETS[m]["latent"] == "spherical"]

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 2)
        echo(f"[{time.perf_counter() - t_start:6.1f} s] {name}: {timings[name]:.1f} s")

    # 1. tokenizer and data (rendered once, shared by every stage)
    t0 = time.perf_counter()
    tokenizer = builtin_tokenizer(cache_dir, progress=progress).eval()
    train_ds = BuiltinImages("train", per_class=cfg.data.per_class, seed=0)
    test_ds = BuiltinImages("test", per_class=cfg.data.test_per_class, seed=0)
    train_x, train_y = train_ds.tensors()
    test_x, test_y = test_ds.tensors()
    num_classes = train_ds.num_classes
    lap("tokenizer + data", t0)

    t0 = time.perf_counter()
    builtin = builtin_evaluator(test_per_class=cfg.data.test_per_class, test_data=(test_x, test_y))
    lap("built-in classifier", t0)

    # 2. spherical projection + decoder finetune
    decoder_path: Path | None = None
    finetune_report: dict[str, Any] = {}
    if spherical_modes:
        t0 = time.perf_counter()
        decoder_path = out / DECODER_FILE
        report_path = out / "spherical_decoder.json"
        if resume and decoder_path.is_file() and report_path.is_file():
            finetune_report = json.loads(report_path.read_text())  # finished: reuse it
        else:
            from torch.utils.data import TensorDataset

            # the one trainer, with the built-in run's recipe pinned (default_finetune_config); a stopped run's
            # finetune resumes from its checkpoint
            result = finetune_decoder(
                tokenizer,
                TensorDataset(train_x, train_y),
                default_finetune_config(cfg),
                out_dir=out / FINETUNE_DIR,
                resume=resume,
                eval_dataset=TensorDataset(test_x, test_y),
                device="cpu",
                progress=progress,
            )
            finetune_report = result.report
            with atomic_path(decoder_path) as tmp:
                save_file(result.decoder_state, str(tmp))
            write_json_atomic(report_path, finetune_report)
        lap("decoder finetune", t0)

    # 3. latents: vanilla-latent runs train on the tokenizer's normalised latents; spherical ones on the raw encoder
    #    output, which the flow projects: exactly what the finetuned decoder saw (SphericalTokenizer.encode)
    t0 = time.perf_counter()
    latents: dict[str, Tensor] = {
        mode: encode_dataset(tokenizer, train_x, progress=progress, raw=mode in spherical_modes) for mode in cfg.modes
    }
    lap("encode latents", t0)

    # Reference rows: a second held-out set (different seed) and its reconstructions through each decoder.
    t0 = time.perf_counter()
    refs: dict[str, dict[str, float]] = {}
    ref_x, ref_y = BuiltinImages("test", per_class=max(2, cfg.eval.num_samples // num_classes), seed=1).tensors()
    refs["real held-out images"] = builtin.evaluate(ref_x, ref_y)
    decoders: dict[str, Any] = {m: tokenizer for m in cfg.modes}
    with torch.no_grad():
        rec = tokenizer.decode(tokenizer.encode(ref_x))
        refs["reconstructions (base decoder)"] = builtin.evaluate(rec, ref_y)
        # one row per decoder, named in the picture; the first 12 held-out images (one of each class)
        recon_rows = {"held-out images": ref_x[:12], "base decoder": rec[:12]}
        if spherical_modes:
            sph = SphericalTokenizer(tokenizer, decoder_state=decoder_path).eval()
            decoders.update({m: sph for m in spherical_modes})
            rec = sph.decode(sph.encode(ref_x))
            refs["reconstructions (spherical, finetuned decoder)"] = builtin.evaluate(rec, ref_y)
            recon_rows["spherical, finetuned decoder"] = rec[:12]
            plain = SphericalTokenizer(tokenizer).eval()
            rec = plain.decode(plain.encode(ref_x))
            refs["reconstructions (spherical, base decoder)"] = builtin.evaluate(rec, ref_y)
            recon_rows["spherical, base decoder"] = rec[:12]
    save_image_grid(
        torch.cat(list(recon_rows.values())),
        out / "reconstructions.png",
        nrow=12,
        row_labels=list(recon_rows),
        title="held-out images (one per class) and their reconstructions through each decoder",
    )
    lap("reference metrics", t0)

    # 4. train every mode with the same budget and seed, evaluating over steps; with `parallel` each mode trains in
    #    its own process on one thread (the runs are independent, so two cores finish two in the time of one).
    results: dict[str, Any] = {"modes": {}, "references": refs}
    history: dict[str, list[dict[str, Any]]] = {}
    # In parallel mode each process draws its own progress bar on its own line.
    jobs = [
        ModeJob(
            cfg,
            mode,
            None if decoder_path is None else Path(os.pardir) / DECODER_FILE,  # relative to the mode's folder
            latents[mode],
            train_y,
            decoders[mode],
            builtin,
            out,
            progress,
            tokenizer.name,
            i if cfg.parallel else 0,
            resume,
        )
        for i, mode in enumerate(cfg.modes)
    ]
    t0 = time.perf_counter()
    if cfg.parallel and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        workers = min(len(jobs), os.cpu_count() or 1)  # the four ablation arms on 2 cores: two at a time
        echo(f"training {', '.join(cfg.modes)} in parallel ({workers} processes, 1 thread each)...")
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            outcomes = list(pool.map(_train_mode, jobs))
    else:
        outcomes = [_train_mode(job) for job in jobs]
    for mode, (final, records) in zip(cfg.modes, outcomes, strict=True):
        results["modes"][mode] = final
        history[mode] = records
    lap(f"train {cfg.train.steps} steps x {len(jobs)} modes + evaluate", t0)

    plot_over_steps(history, out / "metrics_over_steps.png")
    results["finetune"] = finetune_report
    results["classifier"] = builtin.info
    results["timings_s"] = timings
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    results["config"] = to_dict(cfg)
    results["threads"] = torch.get_num_threads()
    table = write_report(results, out, torch.get_num_threads())  # the table, then what its columns mean
    echo("")
    echo(table)
    echo(f"\ntotal wall time {results['total_s']:.0f} s; results, grids and plot in {out}")
    return out


__all__ = ["DECODER_FILE", "FINETUNE_DIR", "QUICK_OVERRIDES", "ModeJob", "run_default"]
