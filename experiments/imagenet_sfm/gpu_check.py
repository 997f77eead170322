#!/usr/bin/env python3
"""The GPU check of the ImageNet-256 recipe: every stage at small size on the real code paths, in one command, on a
bare GPU machine with nothing to download (see ``gpu_check.sh``).

Budget: under 8 minutes of wall clock on one GPU, every stage with its own time slice (``GPU_SLICES``; a goal, not a
measurement: it has not run on a GPU yet). A stage that overruns its slice is stopped and reported as ``timeout``;
one that fails is reported with its error line; later stages that do not need it still run.

Stages, each through the ``manifold-fm`` command the recipe uses (run in-process by :func:`run_cli`) or the function
that command calls:

``wheels``
    the packages the GPU image lacks (diffusers, pydantic, geoopt, torch-fidelity and their missing dependencies),
    installed offline from the folder ``scripts/gpu_wheels.py`` builds (``pip install --no-index --find-links``).
``data``
    synthetic JPEGs of assorted sizes in the ImageNet layout (one folder per class) -> ``scripts/prepare_imagenet.py``
    (ADM centre crop, the recipe's step 1) -> image folders of N1 and N2 images (hard links of the crops) and an ADM
    reference batch (``ref.npz``, uint8 NHWC ``arr_0``).
``weights``
    a FLUX.2-architecture VAE (``diffusers.AutoencoderKLFlux2`` built from its config with random weights, saved
    with ``save_pretrained``, loaded by path from then on) and a torch-fidelity Inception weights file with random
    weights (batch-norm statistics calibrated on random images), verified to load into torch-fidelity's network.
``extract``
    ``manifold-fm extract-latents`` (bf16 VAE, flips, bf16 store) on N1 then N2 images after a warm-up;
    ``images_per_s`` = (N2 - N1) / (t2 - t1): source images (each encoded twice), start-up cancelled. On a GPU
    machine the stage runs under ``accelerate launch --num_processes 1`` with ``--device auto`` (the process's
    accelerate device: the launcher path of sharded extraction).
``finetune``
    ``manifold-fm finetune-decoder`` (spherical decoder + discriminator, adversarial terms from step 0, fp32 as the
    recipe runs it) in its own process, checkpointing every C steps, killed (SIGKILL) while it writes checkpoint 2C,
    then finished with ``--resume`` in the check's process (its peak memory measured); the stage proves the resume
    from the run's ``meta.json`` sessions (the second starts at step C, the last complete checkpoint, and runs only
    the remaining steps) and that the half-written checkpoint was cleaned up. ``images_per_s``: the trainer's
    ``samples_per_s`` over the logged windows, each session's first window (start-up) dropped.
``train``
    ``manifold-fm train`` of the grid's ``flux2-B2-{linear,spherical}-80ep`` configs (SiT-B/2, bf16, EMA, class
    dropout) on the latent cache through the real loader (``data.source: latents``), at batch 256 (the one-GPU
    figure: images/s, MFU, peak memory, the spherical/linear step-time ratio) and at batch 32 (what each of 8 GPUs
    runs at global batch 256); rates from the trainer's own ``samples_per_s`` with the first window dropped. On a
    GPU machine the stage runs under ``accelerate launch --num_processes 1`` (the launcher path of
    ``scripts/train.sh``).
``train_fid``
    a short spherical run with one FID-over-training evaluation (``train.eval_every``, Inception with the random
    weights: timing only).
``sample``
    ``manifold-fm sample`` of the spherical run (CFG 1.5, ADM ``.npz``) with ``--precision fp32`` (IEEE float32,
    TF32 off) and ``--precision bf16`` (what ``auto`` means on a GPU); per precision three timed runs give the cost
    per image per step and per image outside the steps (decode, transfer, writing). Then the on-sphere check:
    samples of the trained (not EMA: those barely left the zero-initialised output layer) weights through
    ``sampler.generate`` with ``SamplerSpec(precision="bf16")`` and ``precision="fp32"``, with the maximum
    token-radius error and the network's output RMS in the same precision (which shows the output layer is not
    zero, and differs between the two when the precision took effect).
``evaluate``
    ``manifold-fm evaluate --precision bf16`` of that ``.npz`` against the reference through torch-fidelity's
    Inception network (random weights: timing only), plus the network's own images/s in fp32 (what the recipe's
    ``evaluate`` runs: its default) and in bf16.
``multiprocess``
    two processes through ``accelerate launch --multi_gpu``: NCCL when the machine has 2 GPUs; on one GPU, two
    gloo ranks on the CPU with the GPU hidden (two NCCL ranks cannot share one GPU), a short spherical run with an
    FID-over-training evaluation. Multi-GPU training is not exercised on a one-GPU machine.

The report (one JSON object on stdout, also written to ``--out``, by ``gpu_check.sh`` to ``$OUT/gpu_check.json``)
holds each stage's status, seconds, slice and figures, the ``summary`` (images/s, MFU against the card's dense bf16
peak, peak memory, spherical/linear ratio, on-sphere errors) and ``estimate_80ep_B2_pair``: what the 80-epoch
FLUX.2 SiT-B/2 pair would take on 8 such GPUs, computed from the measured figures (:func:`recipe_estimate`; an
estimate, labelled so, never a measurement).

``--cpu`` runs the same stages and code with tiny shapes on the CPU, in-process, in seconds (the test suite runs
it); there torch-fidelity's Inception is swapped for a small stand-in network (Inception and the 2048 x 2048 matrix
square roots of its features are far too slow for the suite on one core), and the figures measure nothing.

This is the repository's one GPU throughput tool and holds its one peak-FLOPs table (:data:`PEAK_BF16_FLOPS`) and
MFU formula (:func:`mfu`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CONFIGS = HERE / "configs"
DEFAULT_WHEELS = HERE / "wheels"

# ----------------------------------------------------------------------------- peak table, MFU, recipe constants
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s; matched on the device name.
# The repository's only peak table: MFU figures anywhere come from :func:`peak_flops` and :func:`mfu`.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989.4e12,
    "H100": 989.4e12,  # SXM; the PCIe card is 756e12: pass --peak-tflops for it
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
}
IMAGENET_TRAIN_IMAGES = 1_281_167
RECIPE = {
    "gpus": 8,
    "train_steps": 400_400,  # 80 epochs at global batch 256
    "train_batch": 256,
    "finetune_epochs": 5,
    "finetune_batch": 32,
    "finetune_runs": 2,  # the spherical decoder and the FT-vanilla control
    "fid_samples": 50_000,
    "fid_steps": 250,
    "fid_scales": (1.0, 1.5, 2.0),
}
SPHERE_TOLERANCE = 1e-4  # max | |z| / sqrt(d) - 1 | of spherical samples (exp-map steps in float32)


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> tuple[float | None, str]:
    """The device's dense bf16 peak (FLOP/s) and where the figure came from."""
    if override_tflops is not None:
        return override_tflops * 1e12, "--peak-tflops"
    if not device_name:
        return None, "no GPU"
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return flops, f"data sheet, dense bf16 ({key})"
    return None, f"unknown device '{device_name}': pass --peak-tflops"


def mfu(forward_flops: float, images_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation of training: ``3 * forward_flops * images_per_s / peak`` (forward + backward ~ 3
    forwards; ``forward_flops`` per image, ``peak`` in FLOP/s); ``None`` without a peak."""
    return 3 * forward_flops * images_per_s / peak if peak else None


# ----------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Spec:
    """Shapes, lengths and time slices of one check run (:data:`GPU`, :data:`CPU`)."""

    mode: str  # "gpu" or "cpu"
    device: str
    image_size: int
    classes: int
    raw_per_class: int  # synthetic source JPEGs per class (then cropped by prepare_imagenet.py)
    images_small: int  # N1: images of the first timed extraction
    images: int  # N2: images of the second, and of the cache the runs train on
    vae: dict[str, Any]  # AutoencoderKLFlux2 config overrides ({}: FLUX.2's own)
    vae_dtype: str
    workers: int
    extract_batch: int
    finetune_batch: int
    finetune_steps: int  # the run's length
    finetune_checkpoint_every: int  # C: the run is killed while writing checkpoint 2C and resumed from C
    finetune_log_every: int  # the rate's windows (each session's first dropped)
    eval_items: int
    sit: str
    train_batch: int
    train_batch_per_gpu: int  # what each of RECIPE["gpus"] GPUs runs at global batch 256
    log_every: int  # the first window (warm-up) is dropped
    train_steps: int  # after the warm-up window
    mixed_precision: str
    compile: bool
    fid_steps: int
    fid_samples: int
    fid_sampler_steps: int
    sample_batch: int
    sample_steps: tuple[int, int]  # (S1, S2)
    cfg_scale: float
    sphere_samples: int
    evaluate_batch: int
    mp_sit: str
    budget_s: float
    slices: dict[str, float] = field(default_factory=dict)


GPU_SLICES = {
    "wheels": 35,
    "data": 20,
    "weights": 20,
    "extract": 45,
    "finetune": 65,
    "train": 80,
    "train_fid": 40,
    "sample": 80,
    "evaluate": 25,
    "multiprocess": 40,
}
GPU = Spec(
    mode="gpu",
    device="cuda",
    image_size=256,
    classes=8,
    raw_per_class=8,
    images_small=512,
    images=2560,
    vae={},
    vae_dtype="bfloat16",
    workers=8,
    extract_batch=256,
    finetune_batch=16,
    finetune_steps=25,
    finetune_checkpoint_every=8,
    finetune_log_every=4,
    eval_items=8,
    sit="SiT-B/2",
    train_batch=256,
    train_batch_per_gpu=32,
    log_every=10,
    train_steps=30,
    mixed_precision="bf16",
    compile=False,
    fid_steps=10,
    fid_samples=32,
    fid_sampler_steps=25,
    sample_batch=128,
    sample_steps=(5, 25),
    cfg_scale=1.5,
    sphere_samples=64,
    evaluate_batch=64,
    mp_sit="SiT-Micro/2",  # the plumbing of two processes, not their speed
    budget_s=sum(GPU_SLICES.values()),
    slices=GPU_SLICES,
)
CPU = Spec(
    mode="cpu",
    device="cpu",
    image_size=32,
    classes=2,
    raw_per_class=3,
    images_small=4,
    images=8,
    # FLUX.2's block types and 32 latent channels, two narrow levels (f=2) so it runs in milliseconds
    vae={
        "block_out_channels": (8, 8),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 32,
    },
    vae_dtype="float32",
    workers=0,
    extract_batch=4,
    finetune_batch=2,
    finetune_steps=3,
    finetune_checkpoint_every=1,
    finetune_log_every=1,
    eval_items=2,
    sit="SiT-Micro/2",
    train_batch=4,
    train_batch_per_gpu=2,
    log_every=1,
    train_steps=1,
    mixed_precision="no",
    compile=False,
    fid_steps=1,
    fid_samples=4,
    fid_sampler_steps=2,
    sample_batch=2,
    sample_steps=(1, 2),
    cfg_scale=1.5,
    sphere_samples=4,
    evaluate_batch=4,
    mp_sit="SiT-Micro/2",
    budget_s=600,
    slices={name: 120 for name in GPU_SLICES},
)


# ----------------------------------------------------------------------------- one stage's context
class OuterLimit(BaseException):
    """SIGTERM reached the runner (``gpu_check.sh``'s hard limit: stop the stage in flight and write the report) or a
    stage's child process (its slice ended: unwind, stopping what the stage started)."""


class StageError(Exception):
    """A stage cannot go on (a failed command, a check that does not hold); its message is the report's error."""


class Record(dict):
    """A stage's figures, saved to ``path`` (JSON) at every update, so a stage stopped at its slice keeps them."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(dict(self), default=_json_default))
        os.replace(tmp, self.path)


@dataclass
class Context:
    """What a stage function gets: the sizes, the work folder, where its figures go and when its slice ends."""

    spec: Spec
    work: Path
    record: Record
    deadline: float  # time.time() at which the stage's slice ends

    # the work folder's layout, shared by all stages
    @property
    def vae(self) -> Path:
        return self.work / "weights" / "flux2-vae"

    @property
    def inception(self) -> Path:
        return self.work / "weights" / "pt_inception-2015-12-05-6726825d.pth"

    @property
    def reference(self) -> Path:
        return self.work / "ref.npz"

    @property
    def latents(self) -> Path:
        return self.work / "latents" / "flux2"

    @property
    def decoder(self) -> Path:
        return self.work / "decoders" / "flux2" / "decoder.safetensors"

    def run(self, name: str) -> Path:
        return self.work / "runs" / name

    def images(self, small: bool = False) -> Path:
        return self.work / ("imagenet256-small" if small else "imagenet256")

    @property
    def samples(self) -> Path:
        """The ADM ``.npz`` the ``sample`` stage leaves for ``evaluate``."""
        return self.work / "samples" / "fp32-2b" / "samples.npz"


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fresh(*paths: Path) -> None:
    """Remove what an earlier run of the check left at ``paths`` (``--only`` on a kept ``--work`` folder): the
    commands resume what they find (a cache, sample chunks) or refuse a folder that holds a run, so a stage starts
    from nothing to measure and check anything."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _sync() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def run_cli(*args: str) -> float:
    """``manifold-fm ARGS`` in this process (the click command a user runs); returns its wall seconds, the device
    synchronised. A user error of the command becomes a :class:`StageError` with its one line."""
    import click

    from manifold_fm.cli import main

    log("$ manifold-fm " + " ".join(args))
    _sync()
    t0 = time.perf_counter()
    try:
        main.main(list(args), prog_name="manifold-fm", standalone_mode=False)
    except click.ClickException as exc:
        raise StageError(f"manifold-fm {args[0]}: {exc.format_message()}") from None
    _sync()
    return time.perf_counter() - t0


def reset_peak() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    """Peak GPU memory allocated by this process since :func:`reset_peak` (``None`` without a GPU)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def slope(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """``(per_unit, fixed)`` of ``seconds = fixed + per_unit * size`` through two ``(size, seconds)`` points;
    ``None`` when the second point is not slower (the difference is lost in noise: make the sizes further apart)."""
    (n1, t1), (n2, t2) = points
    if n2 <= n1 or t2 <= t1:
        return None
    per = (t2 - t1) / (n2 - n1)
    return per, t1 - per * n1


# ----------------------------------------------------------------------------- stage: wheels
CHECK_MODULES = ("diffusers", "pydantic", "geoopt", "torch_fidelity")


def missing_modules(names: tuple[str, ...] = CHECK_MODULES) -> list[str]:
    importlib.invalidate_caches()
    return [n for n in names if importlib.util.find_spec(n) is None]


def stage_wheels(ctx: Context, wheels: Path) -> None:
    """Install what the image lacks from the carried wheels folder, offline: into the running Python's environment
    with pip resolving every dependency against what is there (one clear error if something is missing), else
    (an environment that cannot be written) with ``--target`` on ``PYTHONPATH``."""
    rec = ctx.record
    missing = missing_modules()
    rec["missing_before"] = missing
    if not missing:
        rec["route"] = "nothing to install: all present"
        return
    req = wheels / "requirements.txt"
    if not req.is_file():
        raise StageError(
            f"{', '.join(missing)} missing and no wheels folder at {wheels}: run "
            "python experiments/imagenet_sfm/scripts/gpu_wheels.py where PyPI is reachable and carry the folder"
        )
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "--no-cache-dir"]
    base += ["--no-compile", "--disable-pip-version-check", "-q"]
    timeout = max(5.0, ctx.deadline - time.time() - 2)
    proc = subprocess.run([*base, "-r", str(req)], capture_output=True, text=True, timeout=timeout)
    rec["route"] = "pip install into the environment"
    if proc.returncode != 0:
        log("pip install into the environment failed; trying --target:\n" + proc.stderr[-2000:])
        target = ctx.work / "site"
        wheel_files = sorted(str(p) for p in wheels.glob("*.whl"))
        proc = subprocess.run(
            [*base, "--no-deps", "--target", str(target), *wheel_files],
            capture_output=True,
            text=True,
            timeout=max(5.0, ctx.deadline - time.time() - 2),
        )
        rec["route"] = f"pip install --target {target}"
        if proc.returncode == 0:
            sys.path.insert(0, str(target))
            os.environ["PYTHONPATH"] = os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            )
    if proc.returncode != 0:
        raise StageError("offline install failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
    still = missing_modules()
    if still:
        raise StageError(f"installed the wheels, yet {', '.join(still)} cannot be imported")
    rec["wheels_in_folder"] = sorted(p.name for p in wheels.glob("*.whl"))  # pip takes a floor wheel only if needed


# ----------------------------------------------------------------------------- stage: data
def synthetic_jpegs(root: Path, classes: int, per_class: int, size: int) -> int:
    """``root/<wnid>/<wnid>_<i>.JPEG``: smooth class-coloured gradients with shapes and noise, of assorted sizes
    around ``size`` (one side at least twice ``size`` in some, so the ADM crop's box-halving runs; one greyscale)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    shapes = [(1.2, 1.6), (2.0, 2.5), (1.0, 1.33), (1.64, 1.17), (2.5, 1.9), (1.1, 1.1), (1.37, 1.95), (3.1, 2.3)]
    n = 0
    for k in range(classes):
        wnid = f"n{k + 1:08d}"
        (root / wnid).mkdir(parents=True, exist_ok=True)
        colour = rng.uniform(40, 215, 3)
        for i in range(per_class):
            fw, fh = shapes[(i + k) % len(shapes)]
            w, h = max(size, round(fw * size)), max(size, round(fh * size))
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            img = colour + 40 * np.stack([np.sin(xx / (7 + i)), np.cos(yy / (5 + k)), np.sin((xx + yy) / 11)], -1)
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.4) * min(h, w)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 255 - colour
            img += rng.normal(0, 8, img.shape)
            pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
            if i == 1 and k == 0:
                pil = pil.convert("L")
            pil.save(root / wnid / f"{wnid}_{i}.JPEG", quality=90)
            n += 1
    return n


def linked_folder(src: Path, dst: Path, count: int) -> None:
    """An ImageNet-layout folder of ``count`` images (spread evenly over ``src``'s classes) that are hard links to
    ``src``'s files (copies across file systems), so volume costs no image generation."""
    classes = sorted(p for p in src.iterdir() if p.is_dir())
    for k, folder in enumerate(classes):
        files = sorted(folder.glob("*.png"))
        out = dst / folder.name
        out.mkdir(parents=True, exist_ok=True)
        for i in range(count // len(classes) + (k < count % len(classes))):
            target = out / f"{folder.name}_{i:05d}.png"
            try:
                os.link(files[i % len(files)], target)
            except OSError:
                shutil.copyfile(files[i % len(files)], target)


def stage_data(ctx: Context) -> None:
    import numpy as np
    from PIL import Image

    s, rec = ctx.spec, ctx.record
    raw, prepared = ctx.work / "raw", ctx.work / "prepared"
    rec["raw_images"] = synthetic_jpegs(raw, s.classes, s.raw_per_class, s.image_size)
    prep = _load_script(HERE / "scripts" / "prepare_imagenet.py", "imagenet_sfm_prepare")
    workers = max(1, s.workers)
    args = ["--src", str(raw), "--dst", str(prepared), "--size", str(s.image_size), "--workers", str(workers)]
    if prep.main([*args, "--no-progress"]) != 0:
        raise StageError("prepare_imagenet.py failed (see the log)")
    report = json.loads((prepared / "prepare_report.json").read_text())
    rec["prepared"] = {k: report[k] for k in ("images", "written", "skipped", "classes")}
    if report["written"] != rec["raw_images"] or report["skipped"]:
        raise StageError(f"prepare_imagenet.py wrote {report['written']} of {rec['raw_images']} images")
    linked_folder(prepared, ctx.images(), s.images)
    linked_folder(prepared, ctx.images(small=True), s.images_small)
    files = sorted(prepared.rglob("*.png"))
    ref = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    np.savez(ctx.reference, arr_0=ref)
    rec["reference_images"] = len(ref)
    rec["image_folders"] = {"small": s.images_small, "full": s.images}


# ----------------------------------------------------------------------------- stage: weights
def stage_weights(ctx: Context) -> None:
    import torch
    from diffusers import AutoencoderKLFlux2
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from manifold_fm.eval.fid import write_random_inception_weights

    rec = ctx.record
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(**ctx.spec.vae)
    vae.save_pretrained(ctx.vae)
    rec["vae"] = {
        "class": "AutoencoderKLFlux2",
        "params_m": round(sum(p.numel() for p in vae.parameters()) / 1e6, 2),
        "latent_channels": vae.config.latent_channels,
        "block_out_channels": list(vae.config.block_out_channels),
    }
    write_random_inception_weights(ctx.inception, calibration_images=2)
    # what `evaluate` and the FID hook load: torch-fidelity's own network, strict, from this file
    net = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(ctx.inception)
    )
    with torch.no_grad():
        feats = net(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    if tuple(feats[0].shape) != (1, 2048) or not all(bool(torch.isfinite(f).all()) for f in feats):
        raise StageError(f"the random Inception weights give features {tuple(feats[0].shape)} (finite: no)")
    rec["inception"] = {"file": ctx.inception.name, "mib": round(ctx.inception.stat().st_size / 2**20, 1)}


# ----------------------------------------------------------------------------- stage: extract
def stage_extract(ctx: Context) -> None:
    s, rec = ctx.spec, ctx.record
    # GPU: the process's accelerate device (the stage runs under accelerate launch), as a sharded extraction runs
    device = "auto" if s.mode == "gpu" else "cpu"
    base = ["extract-latents", "--tokenizer", str(ctx.vae), "--kind", "flux2", "--device", device]
    base += ["--dtype", s.vae_dtype, "--size", str(s.image_size), "--batch-size", str(s.extract_batch)]
    base += ["--workers", str(s.workers), "--store-dtype", "bfloat16"]
    small = ["--data", str(ctx.images(small=True))]
    fresh(ctx.work / "latents" / "warm", ctx.work / "latents" / "small", ctx.latents)
    run_cli(*base, *small, "--out", str(ctx.work / "latents" / "warm"))  # CUDA context, kernels, page cache
    reset_peak()
    # rounded before the fit, so the reported rate follows from the reported seconds
    t1 = round(run_cli(*base, *small, "--out", str(ctx.work / "latents" / "small")), 6)
    t2 = round(run_cli(*base, "--data", str(ctx.images()), "--out", str(ctx.latents)), 6)
    rec["peak_mem_gib"] = peak_gib()
    rec["run_s"] = {str(s.images_small): t1, str(s.images): t2}
    manifest = json.loads((ctx.latents / "manifest.json").read_text())
    rec["latents"] = {"count": manifest["count"], "shape": manifest["latent_shape"], "dtype": manifest.get("dtype")}
    if manifest["count"] != 2 * s.images:
        raise StageError(f"the cache holds {manifest['count']} latents, expected {2 * s.images} (images + flips)")
    fit = slope([(s.images_small, t1), (s.images, t2)])
    rec["images_per_s"] = None if fit is None else round(1 / fit[0], 4)
    rec["note"] = "source images/s, each encoded with its flip; (N2 - N1) / (t2 - t1) cancels the start-up"


# ----------------------------------------------------------------------------- stage: finetune
def kill_when_ready(
    cmd: list[str], ready: Callable[[], bool], timeout: float, env: Mapping[str, str] | None = None
) -> float:
    """Run ``cmd`` as its own process group and kill the group (SIGKILL: no chance to save) once ``ready()`` holds
    (e.g. the run paused in a checkpoint); returns the seconds it ran. Raises :class:`StageError` if the run ends
    before it is ready or is not ready within ``timeout`` seconds; the group is killed whatever happens."""
    t0 = time.time()
    run = subprocess.Popen(cmd, start_new_session=True, env=None if env is None else dict(env))
    try:
        while not ready():
            if run.poll() is not None:
                raise StageError(f"the run ended (status {run.returncode}) before it could be killed")
            if time.time() - t0 > timeout:
                raise StageError("the run was not ready to be killed before the time slice ended")
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    return time.time() - t0


def _checkpoint_meta(checkpoints: Path) -> tuple[str | None, dict[str, Any]]:
    """The latest complete checkpoint's folder name and ``meta.json`` (``None, {}`` without one)."""
    from manifold_fm.training.checkpoint import latest_checkpoint

    latest = latest_checkpoint(checkpoints)
    if latest is None:
        return None, {}
    return latest.name, json.loads((latest / "meta.json").read_text())


def _session_rate(metrics: Path, sessions: list[dict[str, int]], batch: int) -> float | None:
    """Images/s of a run made of ``sessions`` (``[{"start", "steps"}]``, the trainer's record): the trainer's
    ``samples_per_s`` of every logged window, weighted by its steps (total images over total time), each session's
    first window (process start-up, autotuning) left out; ``None`` without such a window."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    images = seconds = 0.0
    for session in sessions:
        start, end = session["start"], session["start"] + session["steps"]
        logged = [r for r in rows if start < r["step"] <= end and "samples_per_s" in r]
        for before, row in zip(logged, logged[1:], strict=False):  # the first window has no predecessor: dropped
            n = (row["step"] - before["step"]) * batch
            images, seconds = images + n, seconds + n / float(row["samples_per_s"])
    return images / seconds if seconds > 0 else None


def stage_finetune(ctx: Context) -> None:
    """One finetune run, killed while writing checkpoint ``2C`` and resumed from checkpoint ``C`` (module
    docstring). The kill point is fixed by the checkpoint writer's pause hook (``MANIFOLD_FM_TEST_PAUSE_IN_CHECKPOINT``,
    in this run's environment only), so it is the same on every machine whatever the speed."""
    s, rec = ctx.spec, ctx.record
    every, total = s.finetune_checkpoint_every, s.finetune_steps
    kill_at = 2 * every
    if total <= kill_at:
        raise StageError(f"finetune_steps {total} must exceed 2 x finetune_checkpoint_every ({kill_at})")
    out = ctx.decoder.parent
    checkpoints = out / "checkpoints"
    args = ["finetune-decoder", "--tokenizer", str(ctx.vae), "--kind", "flux2", "--device", s.device]
    args += ["--data", str(ctx.images()), "--size", str(s.image_size), "--batch-size", str(s.finetune_batch)]
    args += ["--steps", str(total), "--gan-start", "0", "--eval-items", str(s.eval_items), "--seed", "0"]
    args += ["--workers", str(s.workers), "--checkpoint-every", str(every)]
    args += ["--mixed-precision", "no"]  # fp32, the recipe's setting (README step 2: the paper's finetune is fp32)
    args += ["--set", f"train.log_every={s.finetune_log_every}", "--out", str(out)]
    marker = ctx.work / "finetune-paused-in-checkpoint"
    fresh(out)
    marker.unlink(missing_ok=True)
    env = {**os.environ, "MANIFOLD_FM_TEST_PAUSE_IN_CHECKPOINT": f"{marker}:{kill_at}"}  # pauses once: marker
    if s.mode == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU mode stays on the CPU on a GPU machine too

    def at_kill() -> dict[str, Any]:
        name, meta = _checkpoint_meta(checkpoints)
        return {
            "latest": name,
            "sessions": meta.get("sessions"),
            "half_written": sorted(p.name for p in checkpoints.glob(f"step_{kill_at:08d}.tmp-*")),
        }

    log(f"$ manifold-fm {' '.join(args)}  (killed in checkpoint {kill_at}, then --resume)")
    cmd = [sys.executable, "-m", "manifold_fm.cli", *args]
    killed_after = kill_when_ready(cmd, marker.is_file, ctx.deadline - time.time() - 5, env)
    killed = at_kill()
    # the resumed session in this process (as a user reruns the command), so its peak memory is measured
    reset_peak()
    resumed = run_cli(*args, "--resume")
    rec["peak_mem_gib"] = peak_gib()
    name, meta = _checkpoint_meta(checkpoints)
    sessions = meta.get("sessions")
    rec["kill_resume"] = {
        "killed_after_s": round(killed_after, 2),
        "resumed_s": round(resumed, 2),
        "killed_in_checkpoint": kill_at,
        "at_kill": killed,
        "sessions": sessions,
    }
    if killed["latest"] != f"step_{every:08d}" or killed["sessions"] != [{"start": 0, "steps": every}]:
        raise StageError(f"killed in checkpoint {kill_at}, the run's latest complete checkpoint is {killed}")
    if not killed["half_written"]:
        raise StageError(f"no half-written checkpoint {kill_at} after the kill: the kill came at the wrong time")
    expected = [{"start": 0, "steps": every}, {"start": every, "steps": total - every}]
    if name != f"step_{total:08d}" or sessions != expected:
        raise StageError(f"the resume did not continue from step {every}: sessions {sessions}, latest {name}")
    leftovers = sorted(p.name for p in checkpoints.glob("*.tmp-*"))
    if leftovers:
        raise StageError(f"the half-written checkpoint was not cleaned up: {leftovers}")
    ips = _session_rate(out / "metrics.jsonl", sessions, s.finetune_batch)
    rec["images_per_s"] = None if ips is None else round(ips, 4)
    rec["batch"] = s.finetune_batch
    rec["note"] = (
        "adversarial terms from step 0 (the recipe: the second half); fp32 (--mixed-precision no, the recipe's); "
        "images/s of one decoder"
    )
    if not ctx.decoder.is_file():
        raise StageError(f"no {ctx.decoder} after the finetune")


# ----------------------------------------------------------------------------- stage: train, train_fid
def _window_rates(metrics: Path) -> list[float]:
    """The trainer's ``samples_per_s`` of every logged window but the first (warm-up, autotuning)."""
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rates = [float(r["samples_per_s"]) for r in rows if "samples_per_s" in r]
    return rates[1:] or rates


def _harmonic(rates: list[float]) -> float:
    """Images/s over equal-sized windows: total images over total time."""
    return len(rates) / sum(1.0 / r for r in rates)


def train_args(
    ctx: Context, mode: str, name: str, batch: int, steps: int, extra: Mapping[str, str] | None = None
) -> list[str]:
    """``manifold-fm train`` of the grid's FLUX.2 B/2 config for ``mode``, shrunk and pointed at the work folder
    with ``--set`` only (as a user would); ``extra`` adds or replaces settings."""
    s = ctx.spec
    sets = {
        "model.arch": s.sit,
        "tokenizer.name_or_path": str(ctx.vae),
        "data.latents": str(ctx.latents),
        "data.num_workers": str(s.workers),
        "train.steps": str(steps),
        "train.batch_size": str(batch),
        "train.mixed_precision": "'no'" if s.mixed_precision == "no" else s.mixed_precision,  # YAML: bare no = false
        "train.compile": str(s.compile).lower(),
        "train.log_every": str(s.log_every),
        "train.checkpoint_every": str(steps),
        "train.keep_checkpoints": "1",
        **(extra or {}),
    }
    if mode == "spherical":  # the grid's linear configs decode with the original decoder
        sets["tokenizer.decoder_state"] = str(ctx.decoder) if ctx.decoder.is_file() else "null"  # finetune failed
    cfg = CONFIGS / f"flux2-B2-{mode}-80ep.yaml"
    out = ["train", "--config", str(cfg), "--out", str(ctx.run(name))]
    return out + [x for key, value in sets.items() for x in ("--set", f"{key}={value}")]


def stage_train(ctx: Context) -> None:
    """Four runs: linear and spherical at the one-GPU batch and at the per-GPU batch of 8 GPUs; one failing does
    not stop the others."""
    import torch

    from manifold_fm.models.sit import build_sit, sit_forward_flops

    s, rec = ctx.spec, ctx.record
    latent = json.loads((ctx.latents / "manifest.json").read_text())["latent_shape"]
    with torch.device("meta"):
        model = build_sit(s.sit, input_size=latent[-1], in_channels=latent[0], num_classes=s.classes)
    fwd = sit_forward_flops(model)
    rec["forward_gflops_per_image"] = round(fwd / 1e9, 3)
    rec["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    peak, source = peak_flops(_device_name(), ctx_peak_tflops())
    rec["peak_bf16_tflops"], rec["peak_source"] = (None if peak is None else peak / 1e12), source
    steps = s.log_every + s.train_steps
    errors = []
    for batch in (s.train_batch, s.train_batch_per_gpu):
        for mode in ("linear", "spherical"):
            name = f"{mode}-b{batch}"
            fresh(ctx.run(name))
            reset_peak()
            try:
                wall = run_cli(*train_args(ctx, mode, name, batch, steps))
            except Exception as exc:  # noqa: BLE001 - one run's failure is recorded; the others still run
                traceback.print_exc()
                rec[name] = {"error": _one_line(exc)}
                errors.append(name)
                continue
            rates = _window_rates(ctx.run(name) / "metrics.jsonl")
            ips = _harmonic(rates) if rates else None
            util = None if ips is None else mfu(fwd, ips, peak)
            rec[name] = {
                "images_per_s": None if ips is None else round(ips, 2),
                "step_s": None if ips is None else round(batch / ips, 5),
                "mfu": None if util is None else round(util, 4),
                "peak_mem_gib": peak_gib(),
                "timed_steps": s.train_steps,
                "wall_s": round(wall, 2),
            }
    rec["batch"], rec["batch_per_gpu"] = s.train_batch, s.train_batch_per_gpu
    for batch in (s.train_batch, s.train_batch_per_gpu):
        lin, sph = rec.get(f"linear-b{batch}", {}), rec.get(f"spherical-b{batch}", {})
        if lin.get("step_s") and sph.get("step_s"):
            rec[f"spherical_over_linear_step_time_b{batch}"] = round(sph["step_s"] / lin["step_s"], 4)
    if errors:
        raise StageError(f"run(s) {', '.join(errors)} failed: " + "; ".join(rec[n]["error"] for n in errors))


def stage_train_fid(ctx: Context) -> None:
    s, rec = ctx.spec, ctx.record
    name = "spherical-fid"
    extra = {
        "train.eval_every": str(s.fid_steps),
        "eval.samples": str(s.fid_samples),
        "eval.inception_weights": str(ctx.inception),
        "eval.reference": str(ctx.reference),
        "eval.batch_size": str(s.evaluate_batch),
        "sample.steps": str(s.fid_sampler_steps),
    }
    fresh(ctx.run(name))
    reset_peak()
    rec["wall_s"] = round(run_cli(*train_args(ctx, "spherical", name, s.train_batch_per_gpu, s.fid_steps, extra)), 2)
    rec["peak_mem_gib"] = peak_gib()
    rows = [json.loads(line) for line in (ctx.run(name) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if any(k == "fid" or k.startswith("fd[") for k in r)]
    if not evals:
        raise StageError("the run logged no FID evaluation")
    last = evals[-1]
    before = [r["time"] for r in rows if r["step"] == last["step"] and "samples_per_s" in r]
    rec["evaluation"] = {k: v for k, v in last.items() if k not in ("time",)}
    rec["evaluation_s"] = round(last["time"] - before[-1], 2) if before else None
    rec["note"] = (
        f"{s.fid_samples} samples, {s.fid_sampler_steps} sampler steps, Inception with random weights: timing only; "
        "evaluation_s includes the checkpoint written at that step"
    )


# ----------------------------------------------------------------------------- stage: sample
def on_sphere(ctx: Context, run: Path, precision: str) -> dict[str, float]:
    """Spherical samples of ``run``'s trained (not EMA) weights through ``sampler.generate`` in ``precision``
    (``SamplerSpec.precision``: the library's setting, as ``manifold-fm sample --precision`` applies it): the
    maximum token-radius error, and the network's output RMS at t=0 in the same precision (a zero output layer would
    make the check vacuous)."""
    import torch

    from manifold_fm.eval.sample_quality import token_norm_error
    from manifold_fm.precision import precision_scope
    from manifold_fm.sampler import SamplerSpec, generate
    from manifold_fm.training.runs import load_run

    s = ctx.spec
    loaded = load_run(run, use_ema=False, device=s.device, decode=False)
    n = s.sphere_samples
    shape = (n, *loaded.latent_shape)
    labels = torch.arange(n, device=s.device) % loaded.num_classes
    spec = SamplerSpec(method="euler", steps=s.fid_sampler_steps, cfg_scale=s.cfg_scale, precision=precision)
    g = torch.Generator(device=s.device).manual_seed(0)
    z = generate(loaded.model, loaded.flow, shape, spec, generator=g, labels=labels, null_class=loaded.num_classes)
    x0 = loaded.flow.prior(shape, torch.Generator(device=s.device).manual_seed(1), s.device)
    with torch.no_grad(), precision_scope(precision, s.device):
        v = loaded.model.eval()(x0, torch.zeros(n, device=s.device), labels).float()
    err = token_norm_error(z)
    return {
        "max_radius_error": err["max"],
        "mean_radius_error": err["mean"],
        "velocity_rms_t0": float(v.pow(2).mean().sqrt()),
    }


def stage_sample(ctx: Context) -> None:
    """Per precision, after a warm-up: ``(B, S1)``, ``(B, S2)``, ``(2B, S1)`` samples (``B`` per chunk) give
    ``seconds = fixed + B (steps * step_cost + other_cost)``: the cost per image per step (with CFG) and per image
    outside the steps."""
    import numpy as np

    s, rec = ctx.spec, ctx.record
    run = ctx.run(f"spherical-b{s.train_batch}")
    if not (run / "checkpoints" / "latest").is_file():
        raise StageError(f"no trained run to sample: {run.name} of the train stage has no checkpoint")
    b, (s1, s2) = s.sample_batch, s.sample_steps
    base = ["sample", str(run), "--batch-size", str(b), "--cfg-scale", str(s.cfg_scale), "--seed", "0"]
    base += ["--device", s.device]
    out = ctx.work / "samples"
    for precision in ("fp32", "bf16"):
        flag = ["--precision", precision]
        fresh(*(out / f"{precision}-{tag}" for tag in ("warm", "a", "b", "2b")))
        run_cli(*base, *flag, "--num", str(b), "--steps", str(s1), "--out", str(out / f"{precision}-warm"))
        reset_peak()
        secs: dict[str, float] = {}
        for n, k, tag in ((b, s1, "a"), (b, s2, "b"), (2 * b, s1, "2b")):
            wall = run_cli(*base, *flag, "--num", str(n), "--steps", str(k), "--out", str(out / f"{precision}-{tag}"))
            secs[f"{n}x{k}"] = round(wall, 6)  # rounded before the fits: the costs follow from the reported seconds
        t_a, t_b, t_c = secs.values()
        recorded = json.loads((out / f"{precision}-2b" / "sample_info.json").read_text())["precision"]
        if recorded != precision:
            raise StageError(f"sample --precision {precision} recorded precision {recorded!r}")
        step = slope([(s1, t_a), (s2, t_b)])
        step_cost = None if step is None else step[0] / b  # seconds per image per step
        per_image = slope([(b, t_a), (2 * b, t_c)])
        other = None if per_image is None or step_cost is None else max(0.0, per_image[0] - s1 * step_cost)
        row: dict[str, Any] = {
            "run_s": secs,
            "step_ms_per_image": None if step_cost is None else round(1e3 * step_cost, 4),
            "other_ms_per_image": None if other is None else round(1e3 * other, 4),
            "peak_mem_gib": peak_gib(),
        }
        if step_cost is not None and other is not None:
            row[f"images_per_s_{RECIPE['fid_steps']}_steps"] = round(1 / (RECIPE["fid_steps"] * step_cost + other), 3)
        rec[precision] = row
    rec["note"] = (
        "sample --precision fp32 (IEEE float32, TF32 off) and bf16 (autocast of network and decoder, geometry in "
        "float32; what auto means on a GPU); per-step cost with guidance (two network calls per step)"
    )
    with np.load(ctx.samples) as npz:
        rec["npz"] = {
            "arr_0": list(npz["arr_0"].shape),
            "dtype": str(npz["arr_0"].dtype),
            "arr_1": list(npz["arr_1"].shape),
        }
    checks = {}
    for precision in ("bf16", "fp32"):
        checks[precision] = on_sphere(ctx, run, precision)
    rec["on_sphere"] = checks
    bad = [p for p, c in checks.items() if not c["max_radius_error"] < SPHERE_TOLERANCE]
    if bad:
        raise StageError(f"{', '.join(bad)} samples are off the spheres (tolerance {SPHERE_TOLERANCE:g})")
    if not all(c["velocity_rms_t0"] > 1e-6 for c in checks.values()):
        raise StageError("the trained network's output is zero: the on-sphere check would measure nothing")
    if checks["bf16"]["velocity_rms_t0"] == checks["fp32"]["velocity_rms_t0"]:
        raise StageError("the network's output is the same in bf16 and fp32: the precision setting took no effect")


# ----------------------------------------------------------------------------- stage: evaluate
def stage_evaluate(ctx: Context) -> None:
    """``evaluate --precision bf16`` of the sample stage's ``.npz``, then the feature network alone per image in fp32
    (the recipe's ``evaluate``: its default) and bf16: what scales with the number of samples."""
    import torch
    from torch_fidelity.utils import create_feature_extractor

    from manifold_fm.precision import precision_scope

    s, rec = ctx.spec, ctx.record
    out = ctx.work / "evaluate" / "metrics.json"
    args = ["evaluate", str(ctx.samples), "--reference", str(ctx.reference), "--inception-weights", str(ctx.inception)]
    args += ["--precision", "bf16", "--no-prc", "--batch-size", str(s.evaluate_batch), "--out", str(out)]
    reset_peak()
    rec["wall_s"] = round(run_cli(*args, "--no-progress"), 3)
    rec["precision"] = "bf16"
    metrics = json.loads(out.read_text())
    rec["num_samples"] = metrics["num_samples"]
    rec["metrics"] = sorted(k for k in metrics if k not in ("samples", "num_samples"))
    if "fid" not in metrics or not math.isfinite(metrics["fid"]):
        raise StageError(f"evaluate wrote no finite FID: {metrics}")
    cuda = s.device == "cuda"
    net = create_feature_extractor(
        "inception-v3-compat",
        ["2048", "logits_unbiased"],
        cuda=cuda,
        feature_extractor_weights_path=str(ctx.inception),
        verbose=False,
    )
    x = torch.randint(0, 256, (s.evaluate_batch, 3, s.image_size, s.image_size), dtype=torch.uint8)
    x = x.cuda() if cuda else x
    rates = {}
    for precision in ("fp32", "bf16"):
        with torch.no_grad(), precision_scope(precision, s.device):
            net(x)
            _sync()
            t0, iters = time.perf_counter(), 3
            for _ in range(iters):
                net(x)
            _sync()
        rates[precision] = round(iters * s.evaluate_batch / (time.perf_counter() - t0), 2)
    rec["inception_images_per_s"] = rates
    rec["peak_mem_gib"] = peak_gib()


# ----------------------------------------------------------------------------- stage: multiprocess
def stage_multiprocess(ctx: Context) -> None:
    import socket

    import torch

    s, rec = ctx.spec, ctx.record
    gpus = torch.cuda.device_count()
    env = dict(os.environ)
    extra = {
        "model.arch": s.mp_sit,
        "train.threads": "4",
        "data.num_workers": "0",
        "train.eval_every": "4",
        "eval.samples": "2",
        "eval.inception_weights": str(ctx.inception),
        "eval.reference": str(ctx.reference),
        "sample.steps": "4",
    }
    if gpus >= 2:
        rec["backend"] = "nccl, 2 GPUs"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        extra["train.mixed_precision"] = "'no'"
        rec["backend"] = "gloo, 2 CPU processes (the GPU hidden: two NCCL ranks cannot share one GPU)"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fresh(ctx.run("spherical-2proc"))
    args = train_args(ctx, "spherical", "spherical-2proc", 8, 4, extra)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(port), "-m", "manifold_fm.cli", *args]
    log("$ " + " ".join(launch))
    t0 = time.perf_counter()
    proc = subprocess.Popen(launch, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(5.0, ctx.deadline - time.time() - 12))
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        raise StageError("the 2-process run did not finish in its slice") from None
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    if rc != 0:
        raise StageError(f"accelerate launch with 2 processes failed (status {rc}; see the log)")
    rows = [json.loads(x) for x in (ctx.run("spherical-2proc") / "metrics.jsonl").read_text().splitlines() if x]
    rec["evaluated"] = any("fid" in r for r in rows)
    if not rec["evaluated"]:
        raise StageError("the 2-process run logged no FID evaluation")


# ----------------------------------------------------------------------------- the stages and their runner
@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[[Context], None]
    needs: tuple[str, ...] = ()
    launcher: str = "python"  # "accelerate": under `accelerate launch --num_processes 1` when isolated
    gpu_only: bool = False


STAGES: list[Stage] = [
    Stage("data", stage_data, ("wheels",)),
    Stage("weights", stage_weights, ("wheels",)),
    Stage("extract", stage_extract, ("data", "weights"), launcher="accelerate"),
    Stage("finetune", stage_finetune, ("data", "weights")),
    Stage("train", stage_train, ("extract",), launcher="accelerate"),
    Stage("train_fid", stage_train_fid, ("extract",)),
    Stage("sample", stage_sample, ("extract",), launcher="accelerate"),  # and the train stage's spherical run
    Stage("evaluate", stage_evaluate, ("weights", "sample")),
    Stage("multiprocess", stage_multiprocess, ("extract",), gpu_only=True),
]
STAGE_NAMES = ["wheels", *(st.name for st in STAGES)]
_PEAK_TFLOPS: list[float | None] = [None]


def ctx_peak_tflops() -> float | None:
    return _PEAK_TFLOPS[0]


def _device_name() -> str | None:
    """The GPU's name if this process has imported torch and sees one (never imports torch just for this)."""
    torch = sys.modules.get("torch")
    return torch.cuda.get_device_name() if torch is not None and torch.cuda.is_available() else None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to ``proc``'s process group (launchers stop their workers on it), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage_here(stage: Stage, spec: Spec, work: Path, deadline: float) -> int:
    """Run one stage in this process; its figures go to ``work/stages/<name>.json``. Exit status 0: passed."""
    record = Record(work / "stages" / f"{stage.name}.json")
    record["started"] = time.time()
    if spec.mode == "cpu":
        import torch

        torch.set_num_threads(1)  # tiny shapes: extra threads only add synchronisation
    network = standin_inception() if spec.mode == "cpu" else contextlib.nullcontext()
    try:
        # the commands' own output goes with the progress lines: stdout carries the report alone
        with network, contextlib.redirect_stdout(sys.stderr):
            stage.fn(Context(spec, work, record, deadline))
    except Exception as exc:  # noqa: BLE001 - reported in the JSON; the runner goes on with the next stage
        traceback.print_exc()
        record["error"] = _one_line(exc)
        return 1
    finally:
        with contextlib.suppress(Exception):
            record["device"] = _device_name()
    return 0


def _child_command(stage: Stage, spec: Spec, work: Path, deadline: float) -> list[str]:
    me = [str(Path(__file__).resolve()), "--stage", stage.name, "--work", str(work)]
    me += ["--spec", json.dumps(asdict(spec)), "--deadline", str(deadline)]
    if _PEAK_TFLOPS[0] is not None:
        me += ["--peak-tflops", str(_PEAK_TFLOPS[0])]
    if stage.launcher == "accelerate":
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
        return [*launch, "--mixed_precision", "no", "--dynamo_backend", "no", *me]
    return [sys.executable, *me]


def run_stage_isolated(stage: Stage, spec: Spec, work: Path, slice_s: float, logfile: Path) -> tuple[str, float]:
    """Run one stage in a child process (its own process group) for at most ``slice_s``; returns
    ``(status, seconds)`` with status ``pass``, ``fail`` or ``timeout``."""
    deadline = time.time() + slice_s
    logfile.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cmd = _child_command(stage, spec, work, deadline)
    with logfile.open("w") as fh:
        fh.write("$ " + " ".join(cmd[: cmd.index("--spec")]) + " --spec ...\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=slice_s)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            return "timeout", time.perf_counter() - t0
        except BaseException:  # OuterLimit, KeyboardInterrupt: leave nothing running
            _stop_group(proc)
            raise
    return ("pass" if rc == 0 else "fail"), time.perf_counter() - t0


@contextlib.contextmanager
def standin_inception() -> Iterator[None]:
    """CPU mode only: torch-fidelity's ``inception-v3-compat`` name runs a small stand-in network (12 pooled
    features, 4 logits), restored afterwards. Inception itself and its 2048 x 2048 matrix square roots would take
    minutes on one core; everything around the network is unchanged."""
    import torch
    import torch.nn.functional as F
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    head = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))

    class StandIn(FeatureExtractorBase):
        def __init__(self, name: str, features_list: list[str], **kwargs: Any) -> None:
            super().__init__(name, features_list)
            self.register_buffer("head", head.clone())

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("2048", "logits_unbiased")

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return "logits_unbiased" if metric == "isc" else "2048"

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> Any:
            return None

        def forward(self, x: Any) -> tuple[Any, ...]:
            pooled = F.adaptive_avg_pool2d(x.float() / 255.0, 2).flatten(1)
            out = {"2048": pooled, "logits_unbiased": pooled @ self.head}
            return tuple(out[name] for name in self.features_list)

    saved = FEATURE_EXTRACTORS_REGISTRY["inception-v3-compat"]
    FEATURE_EXTRACTORS_REGISTRY["inception-v3-compat"] = StandIn
    try:
        yield
    finally:
        FEATURE_EXTRACTORS_REGISTRY["inception-v3-compat"] = saved


def run_check(
    spec: Spec,
    work: Path,
    *,
    isolate: bool,
    wheels: Path = DEFAULT_WHEELS,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Every stage in order within ``spec.budget_s``; returns the report (:func:`summarise` adds the figures)."""
    t_start = time.time()
    deadline = t_start + spec.budget_s
    stages: dict[str, dict[str, Any]] = {}
    logs = work / "logs"

    def remaining() -> float:
        return deadline - time.time() - 2  # leave time to write the report

    # wheels first, in this process: nothing else imports before the packages are there
    slice_s = min(spec.slices["wheels"], remaining())
    record = Record(work / "stages" / "wheels.json")
    t0 = time.perf_counter()
    try:
        stage_wheels(Context(spec, work, record, time.time() + slice_s), wheels)
        status = "pass"
    except Exception as exc:  # noqa: BLE001 - reported; nothing else can run without the packages
        record["error"] = _one_line(exc)
        status = "fail"
    stages["wheels"] = {"status": status, "seconds": round(time.perf_counter() - t0, 2), "slice_s": slice_s, **record}
    log(f"wheels: {status}")

    for stage in STAGES:
        if only is not None and stage.name not in only:
            continue
        slice_s = min(float(spec.slices[stage.name]), remaining())
        entry: dict[str, Any] = {"slice_s": round(slice_s, 1)}
        # a partial rerun (--only, on a kept --work folder) trusts what the folder holds
        missing = [] if only else [n for n in stage.needs if stages.get(n, {}).get("status") != "pass"]
        if missing:
            stages[stage.name] = {**entry, "status": "skipped", "reason": f"needs {', '.join(missing)}"}
            log(f"{stage.name}: skipped (needs {', '.join(missing)})")
            continue
        if stage.gpu_only and spec.mode != "gpu" and stage.name not in (only or []):
            stages[stage.name] = {**entry, "status": "skipped", "reason": "GPU mode only"}
            continue
        if slice_s < min(10.0, 0.25 * spec.slices[stage.name]):
            stages[stage.name] = {**entry, "status": "skipped", "reason": "the check's budget is spent"}
            log(f"{stage.name}: skipped (budget)")
            continue
        log(f"{stage.name}: start (slice {slice_s:.0f} s)")
        figures = work / "stages" / f"{stage.name}.json"
        t0 = time.perf_counter()
        try:
            if isolate:
                status, secs = run_stage_isolated(stage, spec, work, slice_s, logs / f"{stage.name}.log")
            else:
                rc = run_stage_here(stage, spec, work, time.time() + slice_s)
                secs = time.perf_counter() - t0
                status = "pass" if rc == 0 else "fail"
                if secs > slice_s:
                    entry["over_slice"] = True  # in-process: reported, it cannot be stopped
        except OuterLimit:
            data = json.loads(figures.read_text()) if figures.is_file() else {}
            data["error"] = "stopped by the outer time limit (gpu_check.sh LIMIT_S); figures so far kept"
            stages[stage.name] = {**entry, "status": "timeout", "seconds": round(time.perf_counter() - t0, 2), **data}
            log(f"{stage.name}: stopped by the outer time limit")
            break
        data = json.loads(figures.read_text()) if figures.is_file() else {}
        data.pop("started", None)
        if status == "fail" and "error" not in data:
            data["error"] = _last_line(logs / f"{stage.name}.log")
        if status == "timeout":
            data["error"] = f"stopped at its time slice ({slice_s:.0f} s); figures so far kept"
        stages[stage.name] = {**entry, "status": status, "seconds": round(secs, 2), **data}
        log(f"{stage.name}: {status} in {secs:.1f} s" + (f" - {data['error']}" if "error" in data else ""))
    return {"stages": stages, "wall_s": round(time.time() - t_start, 1)}


def _last_line(path: Path) -> str:
    """The last non-empty line of a log (the error of a child that died without writing its figures)."""
    if not path.is_file():
        return "failed without output"
    lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1][:300] if lines else "failed without output"


# ----------------------------------------------------------------------------- summary and estimate
def figure(stages: Mapping[str, Any], *keys: str) -> Any:
    """``stages[k0][k1]...`` or ``None`` where a level is missing."""
    value: Any = stages
    for k in keys:
        value = value.get(k) if isinstance(value, Mapping) else None
    return value


def _peak_anywhere(stage: Mapping[str, Any]) -> float | None:
    """The largest ``peak_mem_gib`` in a stage's figures (its sub-runs included)."""
    peaks = []
    for key, value in stage.items():
        if key == "peak_mem_gib" and isinstance(value, (int, float)):
            peaks.append(value)
        elif isinstance(value, Mapping):
            inner = _peak_anywhere(value)
            if inner is not None:
                peaks.append(inner)
    return max(peaks) if peaks else None


def summarise(stages: Mapping[str, Mapping[str, Any]], spec: Spec) -> dict[str, Any]:
    """The headline figures of a report's stages (``None`` where a stage did not produce one)."""
    runs = [f"{m}-b{b}" for b in (spec.train_batch, spec.train_batch_per_gpu) for m in ("linear", "spherical")]
    return {
        "extract_images_per_s": figure(stages, "extract", "images_per_s"),
        "finetune_images_per_s": figure(stages, "finetune", "images_per_s"),
        "train_images_per_s": {r: figure(stages, "train", r, "images_per_s") for r in runs},
        "train_mfu": {r: figure(stages, "train", r, "mfu") for r in runs},
        "spherical_over_linear_step_time": figure(
            stages, "train", f"spherical_over_linear_step_time_b{spec.train_batch}"
        ),
        "sample_images_per_s_250_steps": {
            p: figure(stages, "sample", p, "images_per_s_250_steps") for p in ("fp32", "bf16")
        },
        "inception_images_per_s": {
            p: figure(stages, "evaluate", "inception_images_per_s", p) for p in ("fp32", "bf16")
        },
        "fid_over_training_s": figure(stages, "train_fid", "evaluation_s"),
        "on_sphere_max_radius_error": {
            p: figure(stages, "sample", "on_sphere", p, "max_radius_error") for p in ("bf16", "fp32")
        },
        "peak_mem_gib": {name: _peak_anywhere(st) for name, st in stages.items()},
    }


def recipe_estimate(stages: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What the 80-epoch FLUX.2 SiT-B/2 pair (linear + spherical) would take on ``G = RECIPE["gpus"]`` GPUs like
    this one, from the check's measured rates, assuming linear scaling over the GPUs (communication and data loading
    at full size ignored). Hours per item; ``None`` where a rate is missing.

    - extract_latents: ``1,281,167 / (G * r_extract)`` (r counts source images, each encoded with its flip; one
      cache serves both arms; sharded over G processes by ``accelerate launch``);
    - decoder_finetunes: ``2 runs * steps * 32 / (G * r_finetune)``, ``steps = ceil(5 * 1,281,167 / 32)`` (both
      decoders at once on G/2 GPUs each; the check's rate has the adversarial terms on every step, the recipe on
      the second half only: an over-estimate);
    - train_<arm>: ``400,400 * 256 / (G * r_train)``, r_train measured at the per-GPU batch 256 / G;
    - fid50k_sampling_per_arm_<precision>: ``50,000 * (250 * c * (0.5 + 1 + 1) + 3 * o) / G``, c the cost per
      image per step with guidance (scale 1.0 runs the network once per step instead of twice), o the cost per
      image outside the steps (decode, writing);
    - fid50k_evaluate_per_arm: ``3 * (fixed + 50,000 / r_fp32)`` on one GPU, r_fp32 the Inception network's
      images/s in fp32 (the recipe's ``evaluate`` runs its default, fp32), fixed = the check's evaluate wall minus
      its images over the network's rate in the precision it ran (bf16);
    - total_pair: extraction + finetunes + both arms' training, sampling in bf16 (``sample_eval.sh`` samples at the
      configs' ``sample.precision``, ``auto``: bf16 on GPUs) and evaluation, one after the other.
    """
    g, n = RECIPE["gpus"], IMAGENET_TRAIN_IMAGES

    def positive(*keys: str) -> float | None:
        value = figure(stages, *keys)
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

    def hours(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds / 3600, 2)

    h: dict[str, float | None] = {}
    r = positive("extract", "images_per_s")
    h["extract_latents"] = hours(None if r is None else n / (g * r))
    ft_steps = math.ceil(RECIPE["finetune_epochs"] * n / RECIPE["finetune_batch"])
    r = positive("finetune", "images_per_s")
    ft_images = RECIPE["finetune_runs"] * ft_steps * RECIPE["finetune_batch"]
    h["decoder_finetunes"] = hours(None if r is None else ft_images / (g * r))
    per_gpu = RECIPE["train_batch"] // g
    for arm in ("linear", "spherical"):
        r = positive("train", f"{arm}-b{per_gpu}", "images_per_s")
        h[f"train_{arm}"] = hours(None if r is None else RECIPE["train_steps"] * RECIPE["train_batch"] / (g * r))
    network_calls = sum(0.5 if scale == 1.0 else 1.0 for scale in RECIPE["fid_scales"])
    for precision in ("fp32", "bf16"):
        c, o = (
            positive("sample", precision, "step_ms_per_image"),
            figure(stages, "sample", precision, "other_ms_per_image"),
        )
        per_image = None if c is None or o is None else (RECIPE["fid_steps"] * c * network_calls + 3 * o) / 1e3
        h[f"fid50k_sampling_per_arm_{precision}"] = hours(
            None if per_image is None else RECIPE["fid_samples"] * per_image / g
        )
    ran = str(figure(stages, "evaluate", "precision"))  # the precision the check's evaluate command ran in
    r, r_ran = (positive("evaluate", "inception_images_per_s", p) for p in ("fp32", ran))
    wall, num = (positive("evaluate", k) for k in ("wall_s", "num_samples"))
    if r is None or r_ran is None or wall is None or num is None:
        h["fid50k_evaluate_per_arm"] = None
    else:
        fixed = max(0.0, wall - num / r_ran)
        h["fid50k_evaluate_per_arm"] = hours(len(RECIPE["fid_scales"]) * (fixed + RECIPE["fid_samples"] / r))
    sampling, evaluation = h["fid50k_sampling_per_arm_bf16"], h["fid50k_evaluate_per_arm"]
    parts = [h["extract_latents"], h["decoder_finetunes"], h["train_linear"], h["train_spherical"]]
    parts += [None if sampling is None else 2 * sampling, None if evaluation is None else 2 * evaluation]
    total = None if any(p is None for p in parts) else round(sum(parts), 2)  # type: ignore[arg-type]
    return {
        "label": "an estimate computed from this check's measured rates, assuming linear scaling over the GPUs; "
        "not a measurement",
        "gpus": g,
        "hours": h,
        "total_pair_hours": total,
        "total_uses_sampling": "bf16",
        "recipe": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in RECIPE.items()},
            "finetune_steps": ft_steps,
        },
        "formulas": (recipe_estimate.__doc__ or "").split("\n\n", 1)[-1],
    }


# ----------------------------------------------------------------------------- report
def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10, cwd=HERE
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=HERE,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def build_report(spec: Spec, result: Mapping[str, Any], peak_tflops: float | None) -> dict[str, Any]:
    stages = result["stages"]
    device = next((st.get("device") for st in stages.values() if st.get("device")), None)
    peak, source = peak_flops(device, peak_tflops)
    return {
        "check": "experiments/imagenet_sfm/gpu_check.py",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": _git_commit(),
        "mode": spec.mode,
        "device": device or f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "python": platform.python_version(),
        "torch": _version("torch"),
        "packages": {n: _version(n) for n in ("diffusers", "accelerate", "torch_fidelity", "pydantic", "geoopt")},
        "peak_bf16_tflops": None if peak is None else peak / 1e12,
        "peak_source": source,
        "budget_s": spec.budget_s,
        "wall_s": result["wall_s"],
        "note": None
        if spec.mode == "gpu"
        else "cpu mode: tiny shapes on a CPU and a stand-in for Inception; the figures only show the code runs",
        "multi_gpu": "not exercised on a one-GPU machine: two NCCL ranks need one GPU each; the multiprocess stage "
        "runs two gloo ranks on the CPU there (and NCCL on 2 GPUs when the machine has them)",
        "failed": [name for name, st in stages.items() if st["status"] in ("fail", "timeout")],
        "stages": stages,
        "summary": summarise(stages, spec),
        "estimate_80ep_B2_pair": recipe_estimate(stages) if spec.mode == "gpu" else None,
        "spec": asdict(spec),
    }


def _version(module: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(module.replace("_", "-"))
    except md.PackageNotFoundError:
        return None


def results_rows(report: Mapping[str, Any]) -> list[str]:
    """README results-table rows (``| what | figure | date | hardware | commit |``) of a report of this script."""
    s = report["summary"]
    tag = "" if report["mode"] == "gpu" else " (cpu mode: not a measurement)"
    rows = []

    def add(what: str, figure: Any) -> None:
        if figure is not None:
            rows.append((what + tag, figure))

    add("latent extraction, FLUX.2-architecture VAE, bf16, with flips (source img/s)", s["extract_images_per_s"])
    batch = report["spec"]["finetune_batch"]
    add(f"decoder finetune, one decoder, fp32, batch {batch} (img/s)", s["finetune_images_per_s"])
    for key, ips in s["train_images_per_s"].items():
        mfu_value = s["train_mfu"].get(key)
        add(f"SiT training {key} (img/s, MFU)", None if ips is None else f"{ips:.1f}, MFU {_pct(mfu_value)}")
    add("spherical / linear training step time", s["spherical_over_linear_step_time"])
    for p, ips in s["sample_images_per_s_250_steps"].items():
        add(f"sampling {p}, 250 Euler steps, CFG (img/s)", ips)
    for name, st in report["stages"].items():
        if st["status"] in ("fail", "timeout"):
            rows.append((f"stage {name}{tag}", f"{st['status']}: {st.get('error', '')}"))
    meta = f"{report['date_utc']} | {report['device']}, torch {report['torch']} | {report['commit']}"
    return [f"| {what} | {figure} | {meta} |" for what, figure in rows]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, Path)):
        return list(obj) if isinstance(obj, tuple) else str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _load_script(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="GPU check of the ImageNet-256 recipe (see the module docstring).")
    p.add_argument("--cpu", "--cpu-smoke", dest="cpu", action="store_true", help="tiny shapes on the CPU, in-process")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report to this file")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed after)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder")
    p.add_argument("--budget", type=float, default=None, help="seconds for all stages (slices scaled to fit)")
    p.add_argument("--only", default=None, help="comma-separated stages to run (on a kept --work folder)")
    p.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS, help="the wheels folder gpu_wheels.py builds")
    p.add_argument("--isolate", dest="isolate", action="store_true", default=None, help="each stage in a child process")
    p.add_argument("--inline", dest="isolate", action="store_false", help="every stage in this process")
    p.add_argument("--sit", default=None, help="SiT architecture (default SiT-B/2)")
    p.add_argument("--compile", action="store_true", help="train with torch.compile (train.compile=true)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak dense bf16 TFLOP/s for MFU")
    p.add_argument("--rows", type=Path, default=None, metavar="REPORT_JSON", help="print README rows of a report")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rows is not None:
        try:
            print("\n".join(results_rows(json.loads(args.rows.read_text()))))
        except (OSError, ValueError, KeyError) as exc:
            print(f"gpu_check: error: cannot read report {args.rows}: {exc!r}", file=sys.stderr)
            return 1
        return 0
    _PEAK_TFLOPS[0] = args.peak_tflops

    def outer_limit(signum: int, frame: Any) -> None:
        raise OuterLimit

    # SIGTERM (gpu_check.sh's hard limit here; a stage's slice in a child) unwinds the stage, so the processes it
    # started in their own sessions (the finetune runs) are stopped by its cleanup instead of outliving it
    previous = signal.signal(signal.SIGTERM, outer_limit)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    # this checkout, installed or not, for this process and the stages' child processes
    sys.path.insert(0, str(REPO))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    if args.stage is not None:  # a child process: one stage
        spec = Spec(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.spec).items()})
        stage = next(st for st in STAGES if st.name == args.stage)
        return run_stage_here(stage, spec, args.work, args.deadline)
    spec = CPU if args.cpu else GPU
    if args.sit is not None:
        spec = replace(spec, sit=args.sit)
    if args.compile:
        spec = replace(spec, compile=True)
    if args.budget is not None:
        factor = args.budget / spec.budget_s
        spec = replace(spec, budget_s=args.budget, slices={k: v * factor for k, v in spec.slices.items()})
    isolate = (spec.mode == "gpu") if args.isolate is None else args.isolate
    only = None if args.only is None else [x.strip() for x in args.only.split(",") if x.strip()]
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"{spec.mode} mode, budget {spec.budget_s:.0f} s, work folder {work}")
    try:
        result = run_check(spec, work, isolate=isolate, wheels=args.wheels, only=only)
        report = build_report(spec, result, args.peak_tflops)
        text = json.dumps(report, indent=1, default=_json_default)
        print(text)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_name(args.out.name + ".tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, args.out)
            logs = [work / "logs" / f"{name}.log" for name in STAGE_NAMES if (work / "logs" / f"{name}.log").is_file()]
            if logs:  # the children's output, beside the report
                with args.out.with_suffix(".log").open("w") as fh:
                    for path in logs:
                        fh.write(f"===== {path.stem}\n{path.read_text(errors='replace')}\n")
    finally:
        if args.work is None and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    if report["failed"]:
        log(f"stage(s) failed: {', '.join(report['failed'])} (errors in the report)")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
