"""``manifold-fm finetune-decoder``: finetune a tokenizer's decoder (and its discriminator) to decode per-token
projected latents (or raw ones: the FT-vanilla control), one decoder per run folder, and compare decoders on held-out
images.

The training is :func:`~manifold_fm.training.decoder_finetune.finetune_decoder` on the one trainer (checkpoints,
exact ``--resume``, several processes with ``accelerate launch``, ``--mixed-precision``); the held-out report is
:func:`~manifold_fm.tokenizers.finetune.compare_decoders` over the original decoder, this run's and those of finished
runs named with ``--compare``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import click

from ..atomic import write_json_atomic
from ..progress import progress_option
from ..threads import threads_option
from .extract_latents import build_dataset, build_tokenizer, data_options, tokenizer_options


class _RfidImages:
    """Collects uint8 NHWC reconstructions per ``"<decoder>/<latents>"`` key and the held-out originals, in
    memory-mapped ``.npy`` files under ``folder`` (N images per key: RAM stays bounded for large held-out sets)."""

    def __init__(self, folder: Path, capacity: int) -> None:
        self.folder, self.capacity = folder, capacity
        self.arrays: dict[str, Any] = {}
        self.filled: dict[str, int] = {}
        self._reference_key: str | None = None

    def _put(self, key: str, images: Any) -> None:
        import numpy as np
        import torch

        u8 = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        if key not in self.arrays:
            path = self.folder / f"{len(self.arrays)}.npy"
            self.arrays[key] = np.lib.format.open_memmap(
                path, mode="w+", dtype=np.uint8, shape=(self.capacity, *u8.shape[1:])
            )
            self.filled[key] = 0
        start = self.filled[key]
        self.arrays[key][start : start + len(u8)] = u8
        self.filled[key] = start + len(u8)

    def __call__(self, key: str, rec: Any, images: Any) -> None:
        if self._reference_key is None:
            self._reference_key = key
        if key == self._reference_key:  # one copy of the originals per chunk
            self._put("reference", images)
        self._put(key, rec)

    def get(self, key: str) -> Any:
        return self.arrays[key][: self.filled[key]]


def _rfid(collected: _RfidImages, weights: str | None, extractor: str) -> dict[str, float]:
    """Reconstruction FID of every collected ``(decoder, latents)`` pair against the held-out originals."""
    from ..eval.fid import fidelity_metrics

    reference = collected.get("reference")
    result = {}
    for key in collected.arrays:
        if key == "reference":
            continue
        m = fidelity_metrics(
            collected.get(key),
            reference,
            inception_weights=weights,
            feature_extractor=extractor,
            isc=False,
            prc=False,
        )
        result[key] = next(iter(m.values()))
    return result


def _eval_dataset(eval_data: str, size: int) -> Any:
    from ..data.image_folder import image_dataset

    try:  # a missing folder is a problem with a file (exit status 1), a refused size a usage error (2)
        return image_dataset(eval_data, split="test", size=size)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--eval-data: {exc}") from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--size") from None


#: The report's name of a decoder trained on each kind of latents (the rows of the paper's table).
_DECODER_NAME = {"projected": "spherical", "raw": "ft_vanilla"}
_LATENTS_KEY = {"projected": "projected_latents", "raw": "raw_latents"}


def _compared_runs(specs: tuple[str, ...], own: str, source: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``--compare [NAME=]DIR``: each finished finetune folder's decoder, its latents and its run report, by name
    (default ``spherical`` / ``ft_vanilla`` from the folder's ``finetune.latents``)."""
    from ..training.decoder_finetune import DECODER_STATE, finetune_config

    runs: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = "", spec
        path = Path(folder)
        if not (path / "config.yaml").is_file() or not (path / DECODER_STATE).is_file():
            raise click.BadParameter(
                f"{path} holds no finished finetune (config.yaml and {DECODER_STATE}); pass a finetune-decoder --out "
                "folder whose run has ended",
                param_hint="--compare",
            )
        cfg = finetune_config(path / "config.yaml")
        name = name or _DECODER_NAME[cfg.finetune.latents]
        if name in runs or name in ("original", own):
            raise click.BadParameter(
                f"two decoders are named {name!r}; name them: --compare NAME=DIR", param_hint="--compare"
            )
        theirs = {k: cfg.source.get(k) for k in ("tokenizer", "subfolder", "kind", "dtype", "normalization")}
        ours = {k: source.get(k) for k in theirs}
        if theirs != ours:
            raise click.BadParameter(
                f"{path} finetuned another tokenizer ({theirs}, here {ours})", param_hint="--compare"
            )
        report_file = path / "report.json"
        run_report = None
        if report_file.is_file():
            import json

            run_report = json.loads(report_file.read_text()).get("runs", {}).get(_DECODER_NAME[cfg.finetune.latents])
        runs[name] = {
            "dir": path,
            "file": path / DECODER_STATE,
            "latents": _LATENTS_KEY[cfg.finetune.latents],
            "report": run_report,
        }
    return runs


@click.command("finetune-decoder")
@tokenizer_options
@data_options
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run folder: config.yaml, checkpoints/, metrics.jsonl, then decoder.safetensors, discriminator.safetensors "
    "and report.json.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out exactly (a finished run is not retrained or rewritten: its report is printed, "
    "recomputed with --compare).",
)
@click.option(
    "--extend",
    is_flag=True,
    help="With --resume: train the run to a new --steps (a cosine LR schedule needs --reschedule too).",
)
@click.option(
    "--reschedule", is_flag=True, help="With --extend on a cosine LR schedule: accept the schedule of the new length."
)
@click.option("--overwrite", is_flag=True, help="Replace the run in --out (not with --resume).")
@click.option(
    "--latents",
    type=click.Choice(["projected", "raw"]),
    default="projected",
    show_default=True,
    help="Train on projected latents (the spherical decoder) or raw ones (the paper's FT-vanilla control).",
)
@click.option("--steps", type=int, default=None, help="Optimisation steps (default 500 without --epochs).")
@click.option(
    "--epochs",
    type=float,
    default=None,
    help="Length in passes over --data instead of --steps: ceil(epochs * images / batch) steps (the paper: 5).",
)
@click.option("--batch-size", type=int, default=16, show_default=True, help="Global batch (split over processes).")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Adam lr of the decoder (betas 0.5, 0.9).")
@click.option("--disc-lr", type=float, default=None, help="Adam lr of the discriminator (default: --lr).")
@click.option("--l1-weight", type=float, default=1.0, show_default=True)
@click.option("--perceptual-weight", type=float, default=1.0, show_default=True)
@click.option("--gan-weight", type=float, default=0.5, show_default=True, help="LDM's disc_weight.")
@click.option(
    "--gan-start",
    type=int,
    default=None,
    help="First step of the adversarial terms (default: 0 with --disc-ckpt, else steps // 2).",
)
@click.option(
    "--gan-warmup",
    type=int,
    default=0,
    show_default=True,
    help="Steps over which the GAN weight rises linearly from --gan-start (0: on at once, as LDM).",
)
@click.option(
    "--adaptive-gan/--fixed-gan",
    default=True,
    show_default=True,
    help="Scale the GAN term by the LDM gradient-norm ratio at the decoder's last convolution.",
)
@click.option("--grad-clip", type=float, default=None, help="Clip the decoder's gradient norm (LDM: no clipping).")
@click.option(
    "--discriminator",
    type=click.Choice(["nlayer", "patch"]),
    default="nlayer",
    show_default=True,
    help="LDM's PatchGAN (BatchNorm) or the small GroupNorm one of the built-in default run.",
)
@click.option(
    "--disc-layers", type=int, default=None, help="PatchGAN layers (default 3, or the --disc-ckpt architecture)."
)
@click.option(
    "--disc-channels", type=int, default=None, help="PatchGAN base channels (default 64, or from --disc-ckpt)."
)
@click.option(
    "--disc-norm",
    type=click.Choice(["batch", "actnorm"]),
    default=None,
    help="PatchGAN normalisation (default batch, or from --disc-ckpt).",
)
@click.option(
    "--disc-ckpt",
    type=click.Path(dir_okay=False),
    default=None,
    help="Initialise the discriminator from a local file: an LDM-layout autoencoder checkpoint "
    "(loss.discriminator.*) or a saved discriminator state dict.",
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow a pickled --disc-ckpt that holds Python objects (runs its code: only for files you trust).",
)
@click.option(
    "--lpips-vgg",
    type=click.Path(dir_okay=False),
    default=None,
    help="Local torchvision VGG16 weights (vgg16-397923af.pth) for LPIPS.",
)
@click.option(
    "--lpips-lin",
    type=click.Path(dir_okay=False),
    default=None,
    help="Local LPIPS v0.1 linear heads (vgg.pth). Without both files a named fallback distance is used.",
)
@click.option(
    "--mixed-precision",
    type=click.Choice(["no", "bf16", "fp16", "auto"]),
    default="no",
    show_default=True,
    help="Autocast of the decoder, discriminator and perceptual forward passes (auto: bf16 on GPUs that have it).",
)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a key of the run's config (kind: finetune), e.g. --set train.log_every=1, --set "
    "train.ema_decay=0.999, --set train.log_with=[tensorboard] (repeatable; applied after the options above).",
)
@click.option(
    "--eval-data",
    default=None,
    help="Held-out images for the report: 'builtin' (its test split) or an image folder. Default: the built-in "
    "split not trained on for --data builtin, else --eval-items images held out of --data (excluded from training).",
)
@click.option(
    "--eval-items",
    type=int,
    default=64,
    show_default=True,
    help="Held-out images in the report (spread over the set), rFID included.",
)
@click.option(
    "--compare",
    "compare",
    multiple=True,
    metavar="[NAME=]DIR",
    help="Also report the decoder of a finished finetune-decoder --out folder (same tokenizer), named NAME (default "
    "from its latents: spherical or ft_vanilla); repeatable. With --resume on a finished run: the full table.",
)
@click.option("--workers", type=int, default=0, show_default=True, help="Image-reading worker processes.")
@click.option(
    "--inception-weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="Local torch-fidelity Inception weights (pt_inception-2015-12-05-6726825d.pth): adds rFID over the "
    "--eval-items held-out images.",
)
@click.option(
    "--fid-extractor",
    default="inception-v3-compat",
    hidden=True,
    help="torch-fidelity feature extractor for rFID (tests register a small stand-in).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@threads_option
@progress_option
def finetune_decoder(
    tokenizer_spec: str,
    subfolder: str | None,
    kind: str,
    dtype: str,
    device: str,
    normalization: str | None,
    vae_slicing: bool,
    vae_tiling: bool,
    data_spec: str,
    split: str,
    size: int,
    per_class: int | None,
    out_dir: Path,
    resume: bool,
    extend: bool,
    reschedule: bool,
    overwrite: bool,
    latents: str,
    steps: int | None,
    epochs: float | None,
    batch_size: int,
    lr: float,
    disc_lr: float | None,
    l1_weight: float,
    perceptual_weight: float,
    gan_weight: float,
    gan_start: int | None,
    gan_warmup: int,
    adaptive_gan: bool,
    grad_clip: float | None,
    discriminator: str,
    disc_layers: int | None,
    disc_channels: int | None,
    disc_norm: str | None,
    disc_ckpt: str | None,
    trust_pickle: bool,
    lpips_vgg: str | None,
    lpips_lin: str | None,
    mixed_precision: str,
    checkpoint_every: int,
    overrides: tuple[str, ...],
    eval_data: str | None,
    eval_items: int,
    compare: tuple[str, ...],
    workers: int,
    inception_weights: str | None,
    fid_extractor: str,
    seed: int,
    threads: int | None,
) -> None:
    """Encoder frozen, KL dropped: L1 + LPIPS + LDM's patch discriminator (hinge, adaptive weight), decoder and
    discriminator trained on projected latents (--latents raw: the FT-vanilla control), one decoder per --out run
    folder (checkpoints, --resume; several GPUs with accelerate launch -m manifold_fm.cli finetune-decoder ...). Then
    the held-out report: the original decoder, this one and those of --compare folders side by side (PSNR / SSIM /
    LPIPS or the named fallback, rFID with Inception weights) plus the decoder-swap control."""
    import torch
    from torch.utils.data import Subset

    from ..data.builtin_images import BuiltinImages
    from ..tokenizers.finetune import compare_decoders, spread_indices, steps_for_epochs
    from ..tokenizers.perceptual import perceptual_distance
    from ..training.checkpoint import latest_checkpoint
    from ..training.decoder_finetune import DECODER_STATE, finetune_config
    from ..training.decoder_finetune import finetune_decoder as run_finetune
    from ..training.run_folder import OVERWRITE_AND_RESUME

    if overwrite and resume:
        raise click.UsageError(OVERWRITE_AND_RESUME)
    if resume and latest_checkpoint(out_dir / "checkpoints") is None:
        raise click.UsageError(f"--resume: {out_dir} holds no finetune run to continue; run without --resume")
    if (extend or reschedule) and not resume:
        raise click.UsageError("--extend and --reschedule continue a run: pass them with --resume")
    if steps is not None and epochs is not None:
        raise click.BadParameter("give --steps or --epochs, not both", param_hint="--steps/--epochs")
    if steps is None and epochs is None:
        steps = 500
    if (steps is not None and steps < 0) or batch_size < 1 or (epochs is not None and not epochs > 0):
        raise click.BadParameter("steps must be >= 0, epochs > 0 and batch size >= 1")
    if eval_items < 1:
        raise click.BadParameter("--eval-items must be at least 1", param_hint="--eval-items")
    if device != "cpu" and not torch.cuda.is_available():
        raise click.BadParameter(f"{device}: no CUDA device is visible here; use --device cpu", param_hint="--device")
    source = {
        "tokenizer": tokenizer_spec,
        "subfolder": subfolder,
        "kind": kind,
        "dtype": dtype,
        "normalization": normalization,
        "data": data_spec,
        "split": split,
        "size": size,
        "per_class": per_class,
        "held_out_of_data": None,
    }
    own = _DECODER_NAME[latents]
    compared = _compared_runs(compare, own, source)
    # On the CPU until the trainer moves it to this process's device (each process of a multi-GPU run its own).
    tok = build_tokenizer(tokenizer_spec, subfolder, kind, dtype, "cpu", normalization, vae_slicing, vae_tiling)
    dataset = build_dataset(data_spec, split, size, per_class)
    if eval_data is not None:
        eval_set, eval_source = _eval_dataset(eval_data, size), f"--eval-data {eval_data}"
        eval_idx = spread_indices(len(eval_set), eval_items)
    elif data_spec == "builtin":
        other = "test" if split == "train" else "train"  # the split not trained on
        eval_set, eval_source = BuiltinImages(other, size=size), f"built-in {other} split"
        eval_idx = spread_indices(len(eval_set), eval_items)
    else:
        held = spread_indices(len(dataset), eval_items)
        if len(held) >= len(dataset):
            raise click.BadParameter(
                f"--data has {len(dataset)} images: too few to hold out {eval_items}; pass --eval-data",
                param_hint="--eval-items",
            )
        eval_set, eval_idx = dataset, held
        keep = sorted(set(range(len(dataset))) - set(held))
        dataset = Subset(dataset, keep)
        eval_source = f"{len(held)} images held out of --data (excluded from training)"
        source["held_out_of_data"] = eval_items  # which images train depends on it
    if epochs is not None:
        steps = steps_for_epochs(epochs, len(dataset), batch_size)
    cfg = finetune_config(
        {
            "name": out_dir.name,
            "source": source,
            "train": {
                "steps": steps,
                "batch_size": batch_size,
                "seed": seed,
                "mixed_precision": mixed_precision,
                "checkpoint_every": checkpoint_every,
                "threads": threads,
            },
            "optim": {"lr": lr, "grad_clip": grad_clip},
            "finetune": {
                "latents": latents,
                "l1_weight": l1_weight,
                "perceptual_weight": perceptual_weight,
                "gan_weight": gan_weight,
                "gan_start": gan_start,
                "gan_warmup": gan_warmup,
                "adaptive_gan_weight": adaptive_gan,
                "disc_lr": disc_lr,
                "discriminator": discriminator,
                "disc_layers": disc_layers,
                "disc_channels": disc_channels,
                "disc_norm": disc_norm,
                "disc_init": disc_ckpt,
            },
        },
        overrides,
    )
    if resume:
        from ..training.run_folder import check_resume

        status = check_resume(
            out_dir, "finetune", cfg.train.steps, cfg.optim.schedule, extend=extend, reschedule=reschedule
        )
        saved = out_dir / "report.json"
        if status.finished and not compare and saved.is_file():  # nothing to train, nothing to rewrite
            import json

            click.echo(status.finished_line())
            _print_report(json.loads(saved.read_text()))
            return
    try:
        perceptual = perceptual_distance(lpips_vgg, lpips_lin)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    result = run_finetune(
        tok,
        dataset,
        cfg,
        out_dir=out_dir,
        resume=resume,
        overwrite=overwrite,
        perceptual=perceptual,
        trust_pickle=trust_pickle,
        num_workers=workers,
        eval_items=0,  # the side-by-side report below
        device="cpu" if device == "cpu" else None,
    )
    if not result.is_main_process:
        return
    from safetensors.torch import load_file

    states: dict[str, Any] = {"original": None, own: result.decoder_state}
    files: dict[str, str | None] = {"original": None, own: str(out_dir / DECODER_STATE)}
    latents_of = {own: _LATENTS_KEY[latents]}
    for name, run in compared.items():
        states[name], files[name], latents_of[name] = load_file(str(run["file"])), str(run["file"]), run["latents"]
    order = [k for k in ("original", "ft_vanilla", "spherical") if k in states]
    states = {k: states[k] for k in [*order, *(k for k in states if k not in order)]}
    # Side-by-side held-out report; rFID images go to memory-mapped files in a temporary folder under --out.
    want_rfid = inception_weights is not None or fid_extractor != "inception-v3-compat"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".rfid-") as tmp:
        collect = _RfidImages(Path(tmp), len(eval_idx)) if want_rfid else None
        cmp = compare_decoders(
            tok,
            states,
            eval_set,
            eval_idx,
            perceptual=perceptual,
            num_workers=workers,
            on_batch=collect,
            own_latents=latents_of,
        )
        rfid = _rfid(collect, inception_weights, fid_extractor) if collect is not None else {}
    rfid_metric = None
    if want_rfid:
        rfid_metric = "fid" if fid_extractor == "inception-v3-compat" else f"fd[{fid_extractor}]"
        for key, value in rfid.items():
            cmp["metrics"][key]["rfid"] = value  # the reconstruction / swap views share these dicts
    run_report = {k: v for k, v in result.report.items() if k not in ("metrics", "eval_items")}
    runs = {own: {**run_report, "decoder_state": DECODER_STATE, "discriminator_state": "discriminator.safetensors"}}
    runs.update({name: run["report"] for name, run in compared.items()})
    report: dict[str, Any] = {
        "tokenizer": tok.describe(),
        "data": str(data_spec),
        "eval": {"source": eval_source, "images": cmp["images"], "skipped": cmp["skipped"]},
        "perceptual_metric": cmp["perceptual_metric"],
        "rfid_metric": rfid_metric,
        "rfid_images": cmp["images"] if want_rfid else None,
        "decoders": files,
        "reconstruction": cmp["reconstruction"],
        "swap_control": cmp["swap_control"],
        "metrics": cmp["metrics"],
        "runs": runs,
    }
    path = out_dir / "report.json"
    write_json_atomic(path, report, indent=1)
    _print_report(report)
    click.echo(f"wrote {out_dir / DECODER_STATE} and {path}")


def _print_report(report: dict[str, Any]) -> None:
    pm, rm = report["perceptual_metric"], report["rfid_metric"]
    ev = report["eval"]
    click.echo(f"held-out: {ev['images']} images ({ev['source']}); perceptual distance: {pm}")
    click.echo("reconstruction (each decoder on the latents it was trained for):")
    for name, m in report["reconstruction"].items():
        extra = f"  r{rm} {m['rfid']:.3f}" if "rfid" in m else ""
        click.echo(f"  {name:12s} PSNR {m['psnr']:6.2f} dB  SSIM {m['ssim']:.4f}  {pm} {m['perceptual']:.4f}{extra}")
    click.echo("decoder-swap control (the same latents through each decoder): PSNR dB / perceptual")
    for lname, row in report["swap_control"].items():
        cells = "  ".join(f"{name} {m['psnr']:6.2f} / {m['perceptual']:.4f}" for name, m in row.items())
        click.echo(f"  {lname:18s} {cells}")
