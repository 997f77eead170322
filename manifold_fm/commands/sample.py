"""``manifold-fm sample``: class-conditional samples of a trained image run as a PNG grid and/or an ADM ``.npz``.

Shard across processes with accelerate: ``accelerate launch -m manifold_fm.cli sample RUN --num 50000``; each
process writes its chunks to ``shards/`` (one file per chunk), then the main process merges them in index order into
``samples.npz``. A stopped run resumes: rerun the same command and the chunks already written are kept (and said
so); an ``--out`` that already holds samples (finished, or of another request) is refused without ``--overwrite``.
``--checkpoint STEP`` samples a kept checkpoint other than the latest; ``--no-ema`` never reads the EMA file.

A default-run folder (``manifold-fm train`` with no config) holds one image run per mode; ``sample`` samples each
of them, into each mode's folder (or ``--out/<mode>``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import click

from ..atomic import write_json_atomic
from ..progress import progress_option
from ..threads import threads_option


@click.command("sample")
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--num",
    "num_samples",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Number of samples (classes cycle 0, 1, ..., so every class appears equally often).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder (default: RUN/samples-<step>; for a default run, each mode's own folder).",
)
@click.option("--method", default=None, help="Solver: euler, heun, midpoint, rk4, dopri5, ... (default: run config).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Solver steps (default: run config).")
@click.option(
    "--nfe",
    type=click.IntRange(min=1),
    default=None,
    help="Budget of network evaluations per sample: the recommended solver, steps and time grid for it "
    "(manifold_fm.sampler.NFE_PRESETS); instead of --method/--steps/--time-shift.",
)
@click.option(
    "--time-shift",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Fixed-step solvers: time grid warped by this shift (> 1: more steps near the noise; 1: uniform).",
)
@click.option("--cfg-scale", type=float, default=None, help="Classifier-free guidance scale (1 = off).")
@click.option("--cfg-interval", type=(float, float), default=None, help="Apply guidance only for t in [LO, HI].")
@click.option(
    "--precision",
    type=click.Choice(["auto", "bf16", "tf32", "fp32"]),
    default=None,
    help="Arithmetic of the network and decoder: bf16 autocast, TF32 matmuls, or IEEE fp32 (TF32 off); auto: bf16 on "
    "CUDA GPUs, fp32 elsewhere (default: run config's sample.precision).",
)
@click.option("--class", "class_id", type=int, default=None, help="Sample only this class.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--grid/--no-grid", default=True, show_default=True, help="Write grid.png (first 64 samples, a row per class)."
)
@click.option("--npz/--no-npz", default=True, show_default=True, help="Write samples.npz (uint8 NHWC, ADM layout).")
@click.option(
    "--ema/--no-ema",
    default=True,
    show_default=True,
    help="Use the EMA weights (--no-ema: the raw weights; the EMA file is not read).",
)
@click.option(
    "--checkpoint",
    "checkpoint",
    default=None,
    metavar="STEP|PATH",
    help="Sample this kept checkpoint (a step, or a step_* folder) instead of the latest.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the samples already in --out (without it, an existing --out is refused, except to finish the "
    "chunks of the same interrupted request).",
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: this process's accelerate device).")
@threads_option
@progress_option
def sample(
    run: Path,
    num_samples: int,
    out_dir: Path | None,
    method: str | None,
    steps: int | None,
    nfe: int | None,
    time_shift: float | None,
    cfg_scale: float | None,
    cfg_interval: tuple[float, float] | None,
    precision: str | None,
    class_id: int | None,
    seed: int,
    batch_size: int,
    grid: bool,
    npz: bool,
    ema: bool,
    checkpoint: str | None,
    overwrite: bool,
    device: str | None,
) -> None:
    """Sample RUN (a `manifold-fm train` output folder or one of its checkpoints; a default run's folder: each of
    its modes). A manifold run: samples.npy, samples.csv (latitude/longitude for lat/lon data) and samples.png (a
    world map for S^2, the square of angles for the torus, the Poincare disk for hyperbolic space), from its best
    weights by validation NLL (or --checkpoint's)."""
    from accelerate import PartialState

    from ..training.toy import is_manifold_run

    if is_manifold_run(run):
        for path in _sample_manifold_run(run, out_dir, num_samples, method, steps, seed, ema, checkpoint, overwrite):
            click.echo(str(path))
        return

    from ..errors import InputError
    from ..training.runs import default_run_arms
    from ..training.trainer import cpu_only

    if not (grid or npz):
        raise click.UsageError("nothing to write: pass --grid and/or --npz")
    if nfe is not None:
        if method is not None or steps is not None or time_shift is not None:
            raise click.UsageError("--nfe chooses the method, steps and time shift: pass --nfe or those, not both")
        from ..sampler import sampler_for_nfe

        preset = sampler_for_nfe(nfe)
        method, steps, time_shift = preset["method"], preset["steps"], preset["time_shift"]
    state = PartialState(cpu=cpu_only(device))
    chosen = {
        "method": method,
        "steps": steps,
        "time_shift": time_shift,
        "cfg_scale": cfg_scale,
        "cfg_interval": cfg_interval,
        "precision": precision,
    }
    options = {
        "num_samples": num_samples,
        "sampler": {k: v for k, v in chosen.items() if v is not None},
        "class_id": class_id,
        "seed": seed,
        "batch_size": batch_size,
        "grid": grid,
        "npz": npz,
        "ema": ema,
        "device": device,
        "checkpoint": checkpoint,
        "overwrite": overwrite,
    }
    arms = default_run_arms(run)
    if arms is None:
        for path in _sample_run(run, out_dir, state, **options):
            click.echo(str(path))
        return
    # a default run: each mode is an image run in its own folder
    trained = [arm for arm in arms if (arm / "checkpoints").is_dir()]
    if not trained:
        raise InputError(
            f"{run} is a default run whose modes ({', '.join(a.name for a in arms)}) hold no checkpoint yet; "
            f"finish it with manifold-fm train --out {run} --resume"
        )
    for arm in arms:
        if arm not in trained:
            click.echo(f"{arm.name}: no checkpoint yet, skipped")
            continue
        written = _sample_run(arm, None if out_dir is None else out_dir / arm.name, state, **options)
        if written:
            click.echo(f"{arm.name}: {', '.join(map(str, written))}")


def _sample_manifold_run(
    run: Path,
    out_dir: Path | None,
    num: int,
    method: str | None,
    steps: int | None,
    seed: int,
    ema: bool,
    checkpoint: str | None,
    overwrite: bool,
) -> list[Path]:
    """Sample a manifold run: points (``.npy``, ``.csv``) and a plot in the manifold's chart."""
    import numpy as np

    from ..atomic import atomic_path, write_text_atomic
    from ..data.points import sphere_to_latlon
    from ..errors import InputError
    from ..eval.plots import plot_points
    from ..training.toy import load_manifold_run, sample_manifold_run

    loaded = load_manifold_run(run, checkpoint=checkpoint, use_ema=ema)
    out = out_dir or Path(run) / f"samples-{loaded.step:08d}"
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out} already holds samples; pass --overwrite to replace them, or another --out")
    x = sample_manifold_run(loaded, num, seed=seed, method=method, steps=steps)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "samples.npy") as tmp:
        np.save(tmp, x.numpy())
    flat = x.reshape(x.shape[0], -1).double()
    if loaded.cfg.data.latlon is not None:
        header, rows = "lat,lon", sphere_to_latlon(flat)
    else:
        header, rows = ",".join(f"x{i}" for i in range(flat.shape[1])), flat
    write_text_atomic(
        out / "samples.csv", header + "\n" + "\n".join(",".join(f"{v:.6f}" for v in r) for r in rows.tolist()) + "\n"
    )
    spec = f"{method or loaded.cfg.sample.method} x {steps or loaded.cfg.sample.steps}"
    title = f"{loaded.cfg.name}: {num} samples, {loaded.weights} weights, {spec}"
    plot = plot_points(x, loaded.manifold, out / "samples.png", title=title)
    info = {"run": str(run), "step": loaded.step, "weights": loaded.weights, "num_samples": num, "seed": seed,
            "sampler": spec}  # fmt: skip
    write_json_atomic(out / "sample_info.json", info)
    return [out / "samples.npy", out / "samples.csv", plot]


def _sample_run(
    run: Path,
    out_dir: Path | None,
    state: Any,
    *,
    num_samples: int,
    sampler: dict[str, Any],
    class_id: int | None,
    seed: int,
    batch_size: int,
    grid: bool,
    npz: bool,
    ema: bool,
    device: str | None,
    checkpoint: str | None,
    overwrite: bool,
) -> list[Path]:
    """Sample one image run as the command's options say (``sampler``: the sampler settings given, over the run's
    own); returns the files written (none on processes other than the main one)."""
    import torch

    from ..config import validate
    from ..errors import InputError
    from ..eval.image_io import class_grid, merge_shards, save_image_grid, save_npz
    from ..sampler import SamplerSpec
    from ..training.run_folder import clear_sample_folder, sample_folder_guard
    from ..training.runs import load_run, sample_to_shards

    dev = device or str(state.device)
    # User errors (missing run, checkpoint, sampler options) become one line in the CLI group (manifold_fm/cli.py).
    loaded = load_run(run, use_ema=ema, device=dev, progress=state.is_main_process, checkpoint=checkpoint)
    spec = validate(SamplerSpec, {**loaded.cfg.sample.model_dump(include=set(SamplerSpec.model_fields)), **sampler})
    labels = None
    if class_id is not None:
        if not 0 <= class_id < loaded.num_classes:
            raise click.BadParameter(f"must be in [0, {loaded.num_classes})", param_hint="--class")
        labels = torch.full((num_samples,), class_id, dtype=torch.long)
    if loaded.decoder is None:
        raise InputError("this run has no tokenizer (tokenizer.kind: none), so its latents cannot be decoded")
    out = out_dir or (Path(run) / f"samples-{loaded.step:08d}")
    shards = out / "shards"
    request = {
        "run": str(Path(run).resolve()),
        "step": loaded.step,
        "num_samples": num_samples,
        "batch_size": batch_size,
        "seed": seed,
        "class": class_id,
        "ema": ema,
        "spec": spec.model_dump(),
    }
    # every process looks before the main one deletes anything (samples already there are never silently replaced)
    action = sample_folder_guard(out, request, overwrite=overwrite)
    if action == "replace":
        state.wait_for_everyone()
        if state.is_main_process:
            clear_sample_folder(out)
    state.wait_for_everyone()
    kept = len(list(shards.glob("chunk_*.npz"))) if action == "resume" else 0  # before this run samples any
    sample_to_shards(
        loaded,
        num_samples,
        spec,
        shards,
        request,
        seed=seed,
        batch_size=batch_size,
        labels=labels,
        rank=state.process_index,
        world_size=state.num_processes,
        progress=state.is_main_process,
    )
    if action == "resume" and state.is_main_process:
        chunks = -(-num_samples // batch_size)
        click.echo(
            f"{out}: {kept} of {chunks} chunks were on disk from an interrupted run (kept, not resampled)", err=True
        )
    state.wait_for_everyone()
    if not state.is_main_process:
        return []
    arr, lab_np = merge_shards(shards, expected=num_samples)
    written = []
    if npz:
        written.append(save_npz(out / "samples.npz", arr, lab_np))
    if grid:
        n = min(64, arr.shape[0])
        tensor = torch.from_numpy(arr[:n]).permute(0, 3, 1, 2).float() / 127.5 - 1
        images, nrow, row_labels = class_grid(tensor, lab_np[:n].tolist(), loaded.class_names)
        guidance = f", guidance {spec.cfg_scale:g}" if spec.cfg_scale != 1 else ""
        title = f"{loaded.cfg.name} ({loaded.flow.name}): step {loaded.step}, {spec.method} x {spec.steps}{guidance}"
        written.append(save_image_grid(images, out / "grid.png", nrow=nrow, row_labels=row_labels, title=title))
    shutil.rmtree(shards)  # every sample is in samples.npz now
    info = {
        "run": str(run),
        "step": loaded.step,
        "num_samples": int(arr.shape[0]),
        "method": spec.method,
        "steps": spec.steps,
        "time_shift": spec.time_shift,
        "cfg_scale": spec.cfg_scale,
        "cfg_interval": spec.cfg_interval,
        "precision": spec.precision,
        "seed": seed,
        "ema": ema,
        "flow": loaded.flow.name,
    }
    write_json_atomic(out / "sample_info.json", info)
    return written
