"""``manifold-fm finetune-decoder``: finetune a tokenizer's decoder (and its discriminator) to decode per-token
projected latents, with the FT-vanilla control, and compare the decoders on held-out images."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import click

from ..atomic import atomic_path, write_json_atomic
from ..threads import threads_option
from .extract_latents import build_dataset, build_tokenizer, data_options, tokenizer_options


def _save_state(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))


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


@click.command("finetune-decoder")
@tokenizer_options
@data_options
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output directory: decoder.safetensors (spherical), decoder_vanilla.safetensors (FT-vanilla), their "
    "discriminators, report.json.",
)
@click.option("--steps", type=int, default=None, help="Optimisation steps per finetune (default 500 without --epochs).")
@click.option(
    "--epochs",
    type=float,
    default=None,
    help="Length in passes over --data instead of --steps: ceil(epochs * images / batch) steps (the paper: 5).",
)
@click.option("--batch-size", type=int, default=16, show_default=True)
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
    "--vanilla-control/--no-vanilla-control",
    default=True,
    show_default=True,
    help="Also finetune on raw latents with the same recipe (the paper's FT-vanilla control).",
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
    disc_layers: int | None,
    disc_channels: int | None,
    disc_norm: str | None,
    disc_ckpt: str | None,
    trust_pickle: bool,
    lpips_vgg: str | None,
    lpips_lin: str | None,
    vanilla_control: bool,
    eval_data: str | None,
    eval_items: int,
    workers: int,
    inception_weights: str | None,
    fid_extractor: str,
    seed: int,
) -> None:
    """Encoder frozen, KL dropped: L1 + LPIPS + LDM's patch discriminator (hinge, adaptive weight), decoder and
    discriminator trained; reports original, FT-vanilla and spherical decoders side by side on held-out images
    (PSNR / SSIM / LPIPS or the named fallback, rFID with Inception weights) plus the decoder-swap control."""
    from torch.utils.data import Subset

    from ..data.builtin_images import BuiltinImages
    from ..tokenizers.finetune import compare_decoders, finetune_decoder_and_discriminator, spread_indices
    from ..tokenizers.perceptual import perceptual_distance

    if steps is not None and epochs is not None:
        raise click.BadParameter("give --steps or --epochs, not both", param_hint="--steps/--epochs")
    if steps is None and epochs is None:
        steps = 500
    if (steps is not None and steps < 0) or batch_size < 1 or (epochs is not None and not epochs > 0):
        raise click.BadParameter("steps must be >= 0, epochs > 0 and batch size >= 1")
    if eval_items < 1:
        raise click.BadParameter("--eval-items must be at least 1", param_hint="--eval-items")
    tok = build_tokenizer(tokenizer_spec, subfolder, kind, dtype, device, normalization, vae_slicing, vae_tiling)
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
    try:
        perceptual = perceptual_distance(lpips_vgg, lpips_lin)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    states: dict[str, Any] = {"original": None}
    files: dict[str, str | None] = {"original": None}
    runs: dict[str, Any] = {}
    for project in [True, False] if vanilla_control else [True]:
        name = "spherical" if project else "ft_vanilla"
        try:
            result = finetune_decoder_and_discriminator(
                tok,
                dataset,
                steps,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                disc_lr=disc_lr,
                project=project,
                perceptual=perceptual,
                l1_weight=l1_weight,
                perceptual_weight=perceptual_weight,
                gan_weight=gan_weight,
                gan_start=gan_start,
                gan_warmup=gan_warmup,
                adaptive_gan_weight=adaptive_gan,
                grad_clip=grad_clip,
                disc_layers=disc_layers,
                disc_channels=disc_channels,
                disc_norm=disc_norm,  # type: ignore[arg-type]
                disc_init=disc_ckpt,
                trust_pickle=trust_pickle,
                eval_items=0,  # the side-by-side report below replaces the per-run one
                seed=seed,
                num_workers=workers,
            )
        except (FileNotFoundError, ValueError, FloatingPointError) as exc:
            raise click.ClickException(str(exc)) from None
        suffix = "" if project else "_vanilla"
        _save_state(result.decoder_state, out_dir / f"decoder{suffix}.safetensors")
        _save_state(result.discriminator_state, out_dir / f"discriminator{suffix}.safetensors")
        states[name], files[name] = result.decoder_state, f"decoder{suffix}.safetensors"
        rep = result.report
        for key in ("metrics", "rfid", "rfid_note", "eval_items"):  # the side-by-side report below replaces them
            rep.pop(key)
        runs["projected" if project else "vanilla"] = {
            **rep,
            "decoder_state": f"decoder{suffix}.safetensors",
            "discriminator_state": f"discriminator{suffix}.safetensors",
        }
    states = {k: states[k] for k in ("original", "ft_vanilla", "spherical") if k in states}
    # Side-by-side held-out report; rFID images go to memory-mapped files in a temporary folder under --out.
    want_rfid = inception_weights is not None or fid_extractor != "inception-v3-compat"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".rfid-") as tmp:
        collect = _RfidImages(Path(tmp), len(eval_idx)) if want_rfid else None
        try:
            cmp = compare_decoders(
                tok, states, eval_set, eval_idx, perceptual=perceptual, num_workers=workers, on_batch=collect
            )
            rfid = _rfid(collect, inception_weights, fid_extractor) if collect is not None else {}
        except (FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
    rfid_metric = None
    if want_rfid:
        rfid_metric = "fid" if fid_extractor == "inception-v3-compat" else f"fd[{fid_extractor}]"
        for key, value in rfid.items():
            cmp["metrics"][key]["rfid"] = value  # the reconstruction / swap views share these dicts
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
    click.echo(f"wrote {out_dir / 'decoder.safetensors'} and {path}")


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
