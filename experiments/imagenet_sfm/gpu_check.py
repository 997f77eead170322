#!/usr/bin/env python
"""One-GPU throughput check for the ImageNet-256 recipe, with no downloads (see ``gpu_check.sh``).

Everything is randomly initialised and fed synthetic data, so only speed and memory are measured, never quality:

1. **Latent extraction**: a FLUX.2-sized VAE (``diffusers.AutoencoderKLFlux2`` with its default config: 32 latent
   channels, 8x downsampling), saved with ``save_pretrained`` and loaded back by path through
   :meth:`manifold_fm.tokenizers.DiffusersTokenizer.from_pretrained` (the user's code path), encoding synthetic
   ``256 x 256`` images together with their horizontal flips, as ``extract-latents`` does. Reported as source
   images/s (each image is encoded twice): the bf16 encoder alone, and the whole
   :func:`~manifold_fm.data.latents.extract_latents` (host-side items, flips, bf16 shards written to disk).
2. **Training**: SiT-B/2 (``--sit``) on ``(32, 32, 32)`` latents (FLUX.2 at 256 px) through the project's own
   trainer (:class:`~manifold_fm.training.trainer.Trainer`: accelerate with bf16 autocast, AdamW, gradient clipping,
   EMA 0.9999, class dropout 0.1, batch 256, ``torch.compile`` with ``--compile``), for the linear baseline
   (Gaussian prior, straight path) and spherical flow matching (:class:`~manifold_fm.manifolds.TokenSpheres` prior
   and data, geodesic path, tangent-projected loss) in the same process; ``spherical_over_linear_step_time`` is the
   spherical overhead. MFU (:func:`mfu`) = ``3 * forward_flops_per_image * images_per_s / peak_flops`` (forward +
   backward ~ 3 forwards; FLOPs from :func:`manifold_fm.models.sit.sit_forward_flops`, 2 per multiply-add; peak =
   dense bf16 of the device, :data:`PEAK_BF16_FLOPS`).
3. **Sampling**: 50 Euler steps with classifier-free guidance (scale 1.5, one batched call on 2B per step) through
   :func:`manifold_fm.sampler.generate`, in float32 (what ``manifold-fm sample`` runs) and under bf16 autocast, then
   the VAE decode; images/s per mode.

Peak GPU memory (``torch.cuda.max_memory_allocated``) is recorded per section. The result is one JSON object on
stdout (and in ``--out``). ``--cpu-smoke`` runs the same code with tiny shapes on the CPU in seconds (used by the
test suite), so the script is exercised even where no GPU exists.

This is the repository's one GPU throughput tool and holds its one peak-FLOPs table and MFU formula; timings go
through manifold-fm's one timing helper (``manifold_fm/timing.py``, device-synchronised here).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported inside the functions, so --help answers without loading it
    import torch
    from torch import Tensor

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


@dataclass
class CheckSpec:
    """Shapes and step counts of one check run."""

    image_size: int
    vae: dict[str, Any]  # AutoencoderKLFlux2 config overrides ({} = FLUX.2's own shape)
    sit: str
    num_classes: int
    batch: int
    vae_batch: int
    warmup: int
    train_steps: int
    sample_batch: int
    sample_steps: int
    cfg_scale: float
    device: str
    amp: bool
    compile: bool = False


FULL = CheckSpec(
    image_size=256,
    vae={},
    sit="SiT-B/2",
    num_classes=1000,
    batch=256,
    vae_batch=64,
    warmup=10,
    train_steps=40,
    sample_batch=256,
    sample_steps=50,
    cfg_scale=1.5,
    device="cuda",
    amp=True,
)

CPU_SMOKE = CheckSpec(
    image_size=32,
    # Same block types and 32 latent channels as FLUX.2, but two narrow levels (f=2) so it runs in milliseconds.
    vae={
        "block_out_channels": (8, 8),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 32,
    },
    sit="SiT-Micro/2",
    num_classes=10,
    batch=4,
    vae_batch=2,
    warmup=1,
    train_steps=2,
    sample_batch=2,
    sample_steps=2,
    cfg_scale=1.5,
    device="cpu",
    amp=False,
)


# ----------------------------------------------------------------------------- timing helpers
def _sync_fn(device: torch.device) -> Callable[[], None] | None:
    """What synchronises ``device`` before a clock is read (nothing on a CPU)."""
    import torch

    if device.type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def seconds_per_call(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall seconds per call of ``fn`` over ``iters`` calls after ``warmup`` untimed ones, with ``device``
    synchronised before and after each timed call (:func:`manifold_fm.timing.timed`)."""
    from manifold_fm.timing import timed

    return timed({"fn": fn}, iters, warmup=warmup, sync=_sync_fn(device))["fn"].wall_s


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    """The device's dense bf16 peak (FLOP/s) and where the figure came from."""
    import torch

    if override_tflops is not None:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "no GPU"
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops, f"data sheet, dense bf16 ({key})"
    return None, f"unknown device '{name}': pass --peak-tflops"


def mfu(forward_flops: float, images_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation of training: ``3 * forward_flops * images_per_s / peak`` (forward + backward ~ 3
    forwards; ``forward_flops`` per image, ``peak`` in FLOP/s); ``None`` without a peak."""
    return 3 * forward_flops * images_per_s / peak if peak else None


# ----------------------------------------------------------------------------- sections
@contextlib.contextmanager
def saved_flux2_vae(spec: CheckSpec) -> Iterator[Path]:
    """A randomly initialised ``AutoencoderKLFlux2`` saved in diffusers format to a temporary folder."""
    import torch
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(**spec.vae)
    with tempfile.TemporaryDirectory(prefix="gpu_check_vae_") as tmp:
        vae.save_pretrained(tmp)
        del vae
        yield Path(tmp)


def check_extraction(tokenizer: Any, spec: CheckSpec, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Encode synthetic images plus their horizontal flips; images/s counts source images."""
    import torch

    images = torch.rand(spec.vae_batch, 3, spec.image_size, spec.image_size, device=device, dtype=dtype) * 2 - 1
    latents: dict[str, Tensor] = {}

    @torch.no_grad()
    def step() -> None:
        both = torch.cat([images, images.flip(-1)])
        latents["z"] = tokenizer.encode(both)

    _reset_peak(device)
    sec = seconds_per_call(step, device, warmup=1, iters=max(2, spec.warmup // 2))
    z, peak = latents["z"], _peak_gib(device)
    pipeline_ips = extraction_pipeline(tokenizer, spec)
    return {
        "vae_params_m": round(sum(p.numel() for p in tokenizer.vae.parameters()) / 1e6, 2)
        if hasattr(tokenizer, "vae")
        else None,
        "latent_shape": list(z.shape[1:]),
        "batch_images": spec.vae_batch,
        "images_per_s": round(spec.vae_batch / sec, 2),
        "encodes_per_s_with_flips": round(2 * spec.vae_batch / sec, 2),
        "extract_latents_images_per_s": round(pipeline_ips, 2),
        "peak_mem_gib": peak,
    }


def extraction_pipeline(tokenizer: Any, spec: CheckSpec) -> float:
    """Source images/s of :func:`manifold_fm.data.latents.extract_latents` itself (item loading on the host,
    encoding with flips, bf16 shards written to disk) over ``4 * vae_batch`` synthetic images."""
    import torch
    from torch.utils.data import Dataset

    from manifold_fm.data.latents import extract_latents

    class Synthetic(Dataset):
        num_classes = 2
        class_names = ["a", "b"]
        identity = "gpu-check-synthetic"

        def __len__(self) -> int:
            return 4 * spec.vae_batch

        def __getitem__(self, i: int) -> tuple[Tensor, int]:
            g = torch.Generator().manual_seed(i)
            return torch.rand(3, spec.image_size, spec.image_size, generator=g) * 2 - 1, i % 2

    device = torch.device(spec.device)
    with tempfile.TemporaryDirectory(prefix="gpu_check_cache_") as tmp:

        @torch.no_grad()
        def extract() -> None:
            extract_latents(
                tokenizer,
                Synthetic(),
                tmp,
                batch_size=spec.vae_batch,
                flip=True,
                shard_size=2 * spec.vae_batch,
                dtype="bfloat16",
                progress=False,
            )

        return 4 * spec.vae_batch / seconds_per_call(extract, device, warmup=0, iters=1)


def check_training(
    spec: CheckSpec, channels: int, size: int, device: torch.device, flops_peak: float | None, work: Path
) -> dict[str, Any]:
    """SiT training images/s, MFU and peak memory for linear and spherical, through the project's own trainer.

    Each mode runs :meth:`Trainer.fit <manifold_fm.training.trainer.Trainer.fit>` (accelerate, bf16 autocast, AdamW,
    clipping, EMA, class dropout) for ``warmup + train_steps`` steps on synthetic latents held on the host, as a
    latent cache would be; the trainer logs ``samples_per_s`` every ``warmup`` steps and the first window (warm-up,
    autotuning, ``torch.compile``) is dropped.
    """
    import torch

    from manifold_fm.data.sources import TensorSource
    from manifold_fm.models.sit import build_sit, count_parameters, sit_forward_flops
    from manifold_fm.training.builders import preset_flow
    from manifold_fm.training.metrics_log import read_jsonl
    from manifold_fm.training.schema import FLOW_PRESETS, load_image_config
    from manifold_fm.training.trainer import Trainer

    results: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(0)
    n = 2 * spec.batch
    latents = torch.randn(n, channels, size, size, generator=gen)
    labels = torch.randint(0, spec.num_classes, (n,), generator=gen)
    window = max(1, spec.warmup)
    steps = window + spec.train_steps
    precision = "bf16" if spec.amp else "'no'"  # quoted: YAML would read a bare no as false
    for mode in ("linear", "spherical"):
        cfg = load_image_config(
            {"kind": "image", "name": f"gpu-check-{mode}", "model": {"arch": spec.sit}},
            [
                f"flow.path={FLOW_PRESETS[mode]['path']}",
                f"train.steps={steps}",
                f"train.batch_size={spec.batch}",
                "train.class_dropout=0.1",
                "train.ema_decay=0.9999",
                f"train.mixed_precision={precision}",
                f"train.compile={str(spec.compile).lower()}",
                f"train.log_every={window}",
                f"train.checkpoint_every={10 * steps}",  # only the final save, after the last timed window
                "train.keep_checkpoints=1",
                "optim.lr=1e-4",
            ],
        )
        torch.manual_seed(0)
        model = build_sit(spec.sit, input_size=size, in_channels=channels, num_classes=spec.num_classes)
        params, fwd_flops = count_parameters(model), sit_forward_flops(model, batch=1)
        _reset_peak(device)
        trainer = Trainer(
            model,
            preset_flow(mode, channels),
            TensorSource(latents, labels),
            cfg.train,
            cfg.optim,
            work / mode,
            null_class=spec.num_classes,
            device=spec.device,
            progress=False,
        )
        trainer.fit()
        peak = _peak_gib(device)
        rates = [r["samples_per_s"] for r in read_jsonl(work / mode / "metrics.jsonl") if "samples_per_s" in r]
        timed_rates = rates[1:] or rates
        ips = len(timed_rates) / sum(1.0 / r for r in timed_rates)  # harmonic mean = total images / total time
        utilisation = mfu(fwd_flops, ips, flops_peak)
        results[mode] = {
            "images_per_s": round(ips, 2),
            "step_s": round(spec.batch / ips, 5),
            "mfu": None if utilisation is None else round(utilisation, 4),
            "peak_mem_gib": peak,
            "timed_steps": spec.train_steps,
            "final_loss": round(float(trainer.last_loss), 5),
        }
        results["params_m"] = round(params / 1e6, 2)
        results["forward_gflops_per_image"] = round(fwd_flops / 1e9, 3)
        # The accelerator keeps references to the prepared model/optimizer: drop them so the next mode's peak
        # memory is its own.
        trainer.accelerator.free_memory()
        del trainer, model
    results["batch"] = spec.batch
    results["spherical_over_linear_step_time"] = round(results["spherical"]["step_s"] / results["linear"]["step_s"], 4)
    return results


def autocast_net(model: Any, device: torch.device, enabled: bool) -> Any:
    """``model`` with only its own forward under bf16 autocast (float32 output), for the sampler."""
    import torch

    class _Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            with _autocast(device, enabled):
                return self.inner(x, t, y).float()

    return _Net()


def check_sampling(spec: CheckSpec, tokenizer: Any, channels: int, size: int, device: torch.device) -> dict[str, Any]:
    """``spec.sample_steps`` Euler steps with CFG (one batched call on 2B per step) through the project's sampler
    (:func:`manifold_fm.sampler.generate`), then VAE decode; images/s per mode, with the network in float32 (what
    ``manifold-fm sample`` runs) and under bf16 autocast.

    Only the network call is autocast: under ``torch.autocast`` the sphere operations themselves would run their
    reductions in bf16 and leave the samples ~1e-2 off the spheres (measured: radius error 8e-3 after two steps).
    """
    import torch

    from manifold_fm.models.sit import build_sit
    from manifold_fm.sampler import SamplerSpec, generate
    from manifold_fm.training.builders import preset_flow

    torch.manual_seed(0)
    model = build_sit(spec.sit, input_size=size, in_channels=channels, num_classes=spec.num_classes).to(device)
    model.eval().requires_grad_(False)
    labels = torch.randint(0, spec.num_classes, (spec.sample_batch,), device=device)
    # fp32 here: IEEE float32 with TF32 off for the fp32 row; the bf16 row autocasts the network itself (autocast_net)
    sampler = SamplerSpec(method="euler", steps=spec.sample_steps, cfg_scale=spec.cfg_scale, precision="fp32")
    results: dict[str, Any] = {}
    for mode in ("linear", "spherical"):
        flow = preset_flow(mode, channels)
        out: dict[str, Tensor] = {}
        row: dict[str, Any] = {}
        for precision in ("fp32", "bf16") if spec.amp else ("fp32",):
            net = autocast_net(model, device, precision == "bf16")

            @torch.no_grad()
            def run(flow=flow, out=out, net=net) -> None:
                g = torch.Generator(device=device).manual_seed(0)
                out["z"] = generate(
                    net,
                    flow,
                    (spec.sample_batch, channels, size, size),
                    sampler,
                    generator=g,
                    labels=labels,
                    null_class=spec.num_classes,
                )

            _reset_peak(device)
            ode_s = seconds_per_call(run, device, warmup=1 if precision == "bf16" else 0, iters=1)
            row[f"ode_images_per_s_{precision}"] = round(spec.sample_batch / ode_s, 2)
            row[f"peak_mem_gib_{precision}"] = _peak_gib(device)
            on_sphere = float((out["z"].float().norm(dim=1) / math.sqrt(channels) - 1).abs().max())
            if mode == "spherical":
                row[f"max_radius_error_{precision}"] = on_sphere

        @torch.no_grad()
        def decode(out=out) -> None:
            out["img"] = tokenizer.decode(out["z"].to(tokenizer_dtype(tokenizer)))

        dec_s = seconds_per_call(decode, device, warmup=1, iters=1)
        row["decode_images_per_s"] = round(spec.sample_batch / dec_s, 2)
        results[mode] = row
    results.update(steps=spec.sample_steps, solver="euler", cfg_scale=spec.cfg_scale, batch=spec.sample_batch)
    return results


def tokenizer_dtype(tokenizer: Any) -> torch.dtype:
    import torch

    vae = getattr(tokenizer, "vae", None)
    if vae is not None:
        return next(vae.parameters()).dtype
    return torch.float32


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def projection(train: dict[str, Any], spec: CheckSpec, gpus: int = 8, epochs: int = 80) -> dict[str, Any] | None:
    """Wall-clock of the paper's 80-epoch run on ``gpus`` such devices, if throughput scaled linearly (a projection,
    not a measurement: data loading and communication are ignored)."""
    if spec.device != "cuda":
        return None
    images = IMAGENET_TRAIN_IMAGES * epochs
    return {
        f"{mode}_hours_{gpus}gpu_{epochs}ep": round(images / (train[mode]["images_per_s"] * gpus) / 3600, 1)
        for mode in ("linear", "spherical")
    }


def run_check(spec: CheckSpec, peak_tflops: float | None = None, progress: bool = True) -> dict[str, Any]:
    """All three sections; returns the JSON-ready report."""
    import torch

    from manifold_fm.tokenizers import DiffusersTokenizer

    device = torch.device(spec.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device visible; run with --cpu-smoke for the CPU path")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    vae_dtype = torch.bfloat16 if spec.amp else torch.float32
    flops_peak, peak_source = peak_flops(device, peak_tflops)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({os.cpu_count()} cores, {platform.machine()})"
    report: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": _git_commit(),
        "device": device_name,
        "torch": torch.__version__,
        "mode": "full" if spec.device == "cuda" else "cpu-smoke",
        "spec": asdict(spec),
        "peak_bf16_tflops": flops_peak / 1e12 if flops_peak else None,
        "peak_source": peak_source,
        "tf32_matmul": device.type == "cuda",
        "note": None
        if device.type == "cuda"
        else "cpu-smoke: tiny shapes on a CPU; the figures only show the code path runs, they measure nothing",
    }
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[gpu_check {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    with saved_flux2_vae(spec) as vae_dir:
        tokenizer = DiffusersTokenizer.from_pretrained(str(vae_dir), kind="flux2", dtype=vae_dtype, device=device)
    tokenizer.eval()
    channels, size = tokenizer.latent_channels, spec.image_size // tokenizer.downsample
    report["failed"] = []

    def section(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        # One failing section (say, out of memory) must not cost the figures of the others on a one-shot lease.
        log(name)
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded in the report and re-signalled by the exit status
            import traceback

            traceback.print_exc()
            report[name] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"}
            report["failed"].append(name)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def training() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="gpu_check_runs_") as work:
            return check_training(spec, channels, size, device, flops_peak, Path(work))

    section("extraction", lambda: check_extraction(tokenizer, spec, device, vae_dtype))
    section("training", training)
    section("sampling", lambda: check_sampling(spec, tokenizer, channels, size, device))
    report["projection_if_linear_scaling"] = (
        None if "training" in report["failed"] else projection(report["training"], spec)
    )
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    log("done")
    return report


def results_rows(report: dict[str, Any]) -> list[str]:
    """README results-table rows (``| what | figure | date | hardware | commit |``) from a report of this script."""

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def gib(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1f} GiB"

    ext, tr, sm = report["extraction"], report["training"], report["sampling"]
    spec = report["spec"]
    tag = "" if report["mode"] == "full" else " (cpu-smoke: not a measurement)"
    rows = []
    for name, part in (("latent extraction", ext), ("training", tr), ("sampling", sm)):
        if "error" in part:
            rows.append((f"{name}{tag}", f"failed: {part['error']}"))
    if "error" not in ext:
        rows.append(
            (
                f"latent extraction, FLUX.2-sized VAE, {spec['image_size']} px, with flips{tag}",
                f"{ext['images_per_s']:.1f} img/s (encoder), {ext['extract_latents_images_per_s']:.1f} img/s "
                f"(extract_latents); peak {gib(ext['peak_mem_gib'])}",
            )
        )
    for mode in ("linear", "spherical") if "error" not in tr else ():
        t = tr[mode]
        precision = "bf16" if spec["amp"] else "fp32"
        rows.append(
            (
                f"{spec['sit']} {precision} training, batch {tr['batch']}, {mode}{tag}",
                f"{t['images_per_s']:.1f} img/s, MFU {pct(t['mfu'])}, peak {gib(t['peak_mem_gib'])}",
            )
        )
    if "error" not in tr:
        rows.append(
            (
                f"{spec['sit']} spherical / linear training step time{tag}",
                f"{tr['spherical_over_linear_step_time']:.3f}",
            )
        )
    for mode in ("linear", "spherical") if "error" not in sm else ():
        m = sm[mode]
        figure = f"{m['ode_images_per_s_fp32']:.1f} img/s fp32"
        if "ode_images_per_s_bf16" in m:
            figure += f", {m['ode_images_per_s_bf16']:.1f} img/s bf16 autocast"
        figure += f"; decode {m['decode_images_per_s']:.1f} img/s"
        rows.append(
            (f"sampling {sm['steps']} Euler steps, CFG {sm['cfg_scale']}, batch {sm['batch']}, {mode}{tag}", figure)
        )
    meta = f"{report['date_utc']} | {report['device']}, torch {report['torch']} | {report['commit']}"
    return [f"| {what} | {figure} | {meta} |" for what, figure in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Throughput check of the ImageNet-256 SFM recipe on one GPU.")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (seconds); for tests")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report to this file")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 256)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed training steps per mode (default 40)")
    parser.add_argument("--sit", default=None, help="SiT architecture to train and sample (default SiT-B/2)")
    parser.add_argument("--compile", action="store_true", help="train with torch.compile (train.compile=true)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak dense bf16 TFLOP/s for MFU")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--rows",
        type=Path,
        default=None,
        metavar="REPORT_JSON",
        help="print the README results-table rows of an existing report, then exit",
    )
    args = parser.parse_args(argv)
    if args.rows is not None:
        try:
            print("\n".join(results_rows(json.loads(args.rows.read_text()))))
        except (OSError, ValueError, KeyError) as exc:
            print(f"gpu_check: error: cannot read report {args.rows}: {exc!r}", file=sys.stderr)
            return 1
        return 0
    spec = CPU_SMOKE if args.cpu_smoke else FULL
    if args.batch is not None:
        spec = replace(spec, batch=args.batch)
    if args.train_steps is not None:
        spec = replace(spec, train_steps=args.train_steps)
    if args.sit is not None:
        spec = replace(spec, sit=args.sit)
    if args.compile:
        spec = replace(spec, compile=True)
    import torch

    if spec.device == "cpu":
        torch.set_num_threads(1)  # tiny shapes: extra OpenMP threads only add synchronisation (and contention)
    try:
        report = run_check(spec, args.peak_tflops, progress=not args.quiet)
    except (RuntimeError, ImportError, ValueError) as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2, default=_json_default)
    print(text)
    status = 1 if report["failed"] else 0
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.out)
    if status:
        print(f"gpu_check: section(s) failed: {', '.join(report['failed'])} (errors in the report)", file=sys.stderr)
    return status


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, Path)):
        return list(obj) if isinstance(obj, tuple) else str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


if __name__ == "__main__":
    sys.exit(main())
