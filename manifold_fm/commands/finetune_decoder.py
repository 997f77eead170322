"""``manifold-fm finetune-decoder``: finetune a tokenizer's decoder to decode per-token projected latents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..atomic import atomic_path, write_json_atomic
from .extract_latents import build_dataset, build_tokenizer, data_options, tokenizer_options


def _save_state(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def _to_uint8(images: Any) -> Any:
    """``(N, 3, H, W)`` in [-1, 1] -> uint8 NHWC numpy (what torch-fidelity reads)."""
    import torch

    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _rfid(
    tok: Any, states: dict, eval_set: Any, eval_items: int, weights: str | None, extractor: str
) -> dict[str, float]:
    """Reconstruction FID of each (decoder, latents) pair of the report against the held-out originals."""
    import torch

    from ..data.guarded import load_image_batch
    from ..eval.fid import fidelity_metrics
    from ..tokenizers import SphericalTokenizer

    images = load_image_batch(eval_set, list(range(min(eval_items, len(eval_set))))).float()
    recs: dict[str, list] = {}
    with torch.no_grad():
        for start in range(0, len(images), 32):
            x = images[start : start + 32].to(tok.device, tok.dtype)
            raw = tok.encode_raw(x)
            sph = SphericalTokenizer(tok)
            proj = sph.project(raw)
            out = {
                "original_decoder/raw_latents": tok.decode_raw(raw),
                "original_decoder/projected_latents": tok.decode_raw(proj),
            }
            for name, state in states.items():
                dec = SphericalTokenizer(tok, state)
                key = "finetuned_decoder/" + ("projected_latents" if name == "projected" else "raw_latents")
                out[key] = dec.decode_raw((proj if name == "projected" else raw).to(dec.dtype))
            for k, v in out.items():
                recs.setdefault(k, []).append(v.float().cpu())
    reference = _to_uint8(images)
    result = {}
    for k, parts in recs.items():
        m = fidelity_metrics(
            _to_uint8(torch.cat(parts)),
            reference,
            inception_weights=weights,
            feature_extractor=extractor,
            isc=False,
            prc=False,
        )
        result[k] = next(iter(m.values()))
    return result


@click.command("finetune-decoder")
@tokenizer_options
@data_options
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output directory: decoder.safetensors, report.json (and decoder_vanilla.safetensors).",
)
@click.option("--steps", type=int, default=500, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--perceptual-weight", type=float, default=1.0, show_default=True)
@click.option("--gan-weight", type=float, default=0.1, show_default=True)
@click.option("--gan-start", type=int, default=None, help="Discriminator start step (default: steps // 2).")
@click.option(
    "--adaptive-gan/--fixed-gan",
    default=True,
    show_default=True,
    help="Scale the GAN term by the LDM gradient-norm ratio at the decoder's last convolution.",
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
    default=False,
    show_default=True,
    help="Also finetune on raw latents with the same recipe (the paper's FT-vanilla control).",
)
@click.option("--eval-items", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=0, show_default=True, help="Image-reading worker processes.")
@click.option(
    "--inception-weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="Local torch-fidelity Inception weights (pt_inception-2015-12-05-6726825d.pth): adds rFID.",
)
@click.option(
    "--fid-extractor",
    default="inception-v3-compat",
    hidden=True,
    help="torch-fidelity feature extractor for rFID (tests register a small stand-in).",
)
@click.option("--seed", type=int, default=0, show_default=True)
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
    steps: int,
    batch_size: int,
    lr: float,
    perceptual_weight: float,
    gan_weight: float,
    gan_start: int | None,
    adaptive_gan: bool,
    lpips_vgg: str | None,
    lpips_lin: str | None,
    vanilla_control: bool,
    eval_items: int,
    inception_weights: str | None,
    fid_extractor: str,
    workers: int,
    seed: int,
) -> None:
    """Encoder frozen, KL dropped; L1 + perceptual + patch-GAN (with warm-up); reports PSNR/SSIM/perceptual."""
    from ..data.builtin_images import BuiltinImages
    from ..tokenizers.finetune import finetune_decoder as run
    from ..tokenizers.perceptual import perceptual_distance

    if steps < 0 or batch_size < 1:
        raise click.BadParameter("steps must be >= 0 and batch size >= 1")
    tok = build_tokenizer(tokenizer_spec, subfolder, kind, dtype, device, normalization, vae_slicing, vae_tiling)
    dataset = build_dataset(data_spec, split, size, per_class)
    eval_set = BuiltinImages("test", size=size) if data_spec == "builtin" else None
    try:
        perceptual = perceptual_distance(lpips_vgg, lpips_lin)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    want_rfid = inception_weights is not None or fid_extractor != "inception-v3-compat"
    states: dict = {}
    runs = [True, False] if vanilla_control else [True]
    report: dict = {"tokenizer": tok.describe(), "data": str(data_spec), "metrics": {}, "runs": {}}
    for project in runs:
        try:
            state, rep = run(
                tok,
                dataset,
                steps,
                batch_size=batch_size,
                lr=lr,
                project=project,
                perceptual=perceptual,
                perceptual_weight=perceptual_weight,
                gan_weight=gan_weight,
                gan_start=gan_start,
                adaptive_gan_weight=adaptive_gan,
                eval_dataset=eval_set,
                eval_items=eval_items,
                seed=seed,
                num_workers=workers,
            )
        except (ValueError, FloatingPointError) as exc:
            raise click.ClickException(str(exc)) from None
        name = "decoder.safetensors" if project else "decoder_vanilla.safetensors"
        _save_state(state, out_dir / name)
        states["projected" if project else "vanilla"] = state
        report["metrics"].update(rep.pop("metrics"))
        report["runs"]["projected" if project else "vanilla"] = {**rep, "decoder_state": name}
    report["perceptual_metric"] = getattr(perceptual, "name", type(perceptual).__name__)
    report["rfid_metric"] = None
    if want_rfid:
        try:
            rfid = _rfid(
                tok, states, eval_set if eval_set is not None else dataset, eval_items, inception_weights, fid_extractor
            )
        except (FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        report["rfid_metric"] = "fid" if fid_extractor == "inception-v3-compat" else f"fd[{fid_extractor}]"
        for key, value in rfid.items():
            report["metrics"][key]["rfid"] = value
    path = out_dir / "report.json"
    write_json_atomic(path, report, indent=1)
    for key, m in report["metrics"].items():
        extra = f"  r{report['rfid_metric']} {m['rfid']:.3f}" if "rfid" in m else ""
        click.echo(
            f"{key:40s} PSNR {m['psnr']:6.2f} dB  SSIM {m['ssim']:.4f}  {report['perceptual_metric']} "
            f"{m['perceptual']:.4f}{extra}"
        )
    click.echo(f"wrote {out_dir / 'decoder.safetensors'} and {path}")
