"""``manifold-fm probe``: latent-geometry diagnostics (token norms, paths, the shell deviation) and the
component-swap probe (LPIPS or the named fallback, PSNR, optionally DINOv2), as JSON plus PNG figures."""

from __future__ import annotations

from pathlib import Path

import click

from ..atomic import write_json_atomic
from ..progress import progress_option
from ..threads import threads_option
from .extract_latents import build_dataset, build_tokenizer, data_options, tokenizer_options


@click.command("probe")
@tokenizer_options
@data_options
@click.option("--spherical", is_flag=True, help="Probe the spherical version of the tokenizer.")
@click.option(
    "--decoder-state",
    type=click.Path(dir_okay=False),
    default=None,
    help="Finetuned decoder (from finetune-decoder) for the spherical tokenizer.",
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--num", type=int, default=256, show_default=True, help="Images to encode.")
@click.option("--t-points", type=int, default=21, show_default=True, help="Time points along each path.")
@click.option(
    "--pairs",
    type=int,
    default=None,
    help="(prior, data) pairs of the path diagnostics and the shell deviation (default: one per image; more reuse "
    "images with fresh prior samples; the paper: 2048).",
)
@click.option(
    "--anchors",
    "--max-pairs",
    "max_pairs",
    type=int,
    default=64,
    show_default=True,
    help="Anchors (anchor/neighbour pairs) of the swap probe (the paper: 1024; needs --num large enough).",
)
@click.option("--lpips-vgg", type=click.Path(dir_okay=False), default=None)
@click.option("--lpips-lin", type=click.Path(dir_okay=False), default=None)
@click.option(
    "--dinov2-weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="Local DINOv2 ViT state dict (e.g. dinov2_vitb14_pretrain.pth): adds the DINOv2 class-token cosine "
    "distance to the swap probe.",
)
@click.option("--dinov2-size", type=int, default=224, show_default=True, help="DINOv2 input side (multiple of 14).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the Gaussian prior samples.")
@threads_option
@progress_option
def probe(
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
    spherical: bool,
    decoder_state: str | None,
    out_dir: Path,
    num: int,
    t_points: int,
    pairs: int | None,
    max_pairs: int,
    lpips_vgg: str | None,
    lpips_lin: str | None,
    dinov2_weights: str | None,
    dinov2_size: int,
    seed: int,
) -> None:
    """Token-norm statistics (raw, normalised, Gaussian), path diagnostics (linear/polar/slerp) and swap probe."""
    import torch

    from ..eval.geometry import path_diagnostics, shell_deviation_profile, token_norm_stats, token_norms
    from ..eval.probes import component_swap_probe, plot_probe_report
    from ..tokenizers.perceptual import DINOv2Distance, perceptual_distance

    if num < 2 or t_points < 2:
        raise click.BadParameter("--num and --t-points must be at least 2")
    if (pairs is not None and pairs < 1) or max_pairs < 1:
        raise click.BadParameter("--pairs and --anchors must be at least 1")
    tok = build_tokenizer(
        tokenizer_spec,
        subfolder,
        kind,
        dtype,
        device,
        normalization,
        vae_slicing,
        vae_tiling,
        spherical=spherical,
        decoder_state=decoder_state,
    )
    dataset = build_dataset(data_spec, split, size, per_class)
    try:
        perceptual = perceptual_distance(lpips_vgg, lpips_lin)
        extra = {"dinov2": DINOv2Distance(dinov2_weights, dinov2_size)} if dinov2_weights else {}
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    n = min(num, len(dataset))
    # Spread the picks over the dataset so every class is present (the built-in set interleaves classes).
    idx = torch.linspace(0, len(dataset) - 1, n).round().long().unique().tolist()
    from ..data.image_folder import ImageReadError

    render = getattr(dataset, "render", None)
    skipped: list[str] = []
    if callable(render):
        images, labels = render(idx)
    else:
        items = []
        for i in idx:
            try:
                items.append(dataset[i])
            except ImageReadError as exc:
                skipped.append(str(exc))
        if len(items) < 2:
            raise click.ClickException(f"fewer than two readable images among {len(idx)} picked from {data_spec}")
        images, labels = torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
    if skipped:
        click.echo(f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}", err=True)
    with torch.no_grad():
        chunks = [images[i : i + 32].to(tok.device) for i in range(0, len(images), 32)]
        raw = torch.cat([tok.encode_raw(c.to(tok.dtype)).float().cpu() for c in chunks])
        normed = torch.cat([tok.encode(c).float().cpu() for c in chunks])
        g = torch.Generator().manual_seed(seed)
        n_pairs = pairs or normed.shape[0]
        data = normed[torch.arange(n_pairs) % normed.shape[0]]  # more pairs than images: images reused
        prior = torch.randn(data.shape, generator=g)
        ts = torch.linspace(0, 1, t_points)
        report = {
            "tokenizer": tok.describe(),
            "data": str(data_spec),
            "images": int(images.shape[0]),
            "skipped": len(skipped),
            "skipped_items": skipped,
            "norms": {
                "raw": token_norm_stats(raw),
                "normalized": token_norm_stats(normed),
                "gaussian_prior": token_norm_stats(prior),
            },
            "paths": path_diagnostics(prior, data, ts),
            "shell_deviation": shell_deviation_profile(prior, data, ts),
        }
        try:
            report["swap"] = component_swap_probe(
                tok, images, labels, perceptual=perceptual, max_pairs=max_pairs, extra_distances=extra
            )
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = plot_probe_report(
        report, {"raw": token_norms(raw), "normalized": token_norms(normed), "gaussian": token_norms(prior)}, out_dir
    )
    report["figures"] = [p.name for p in figures]
    path = out_dir / "report.json"
    write_json_atomic(path, report, indent=1)
    nr = report["norms"]
    click.echo(
        f"token norm / sqrt(d): raw {nr['raw']['mean_radius_over_sqrt_d']:.3f} (CV {nr['raw']['cv']:.3f}), "
        f"normalised {nr['normalized']['mean_radius_over_sqrt_d']:.3f} (CV {nr['normalized']['cv']:.3f})"
    )
    lin, ts = report["paths"]["linear"], report["paths"]["t"]
    mid = len(ts) // 2
    click.echo(
        f"linear path at t={ts[mid]:.2f}: norm/sqrt(d) {lin['norm_mean_over_sqrt_d'][mid]:.3f}, "
        f"shell deviation {lin['shell_deviation'][mid]:.2f} std, radial share {lin['radial_share'][mid]:.3f}"
    )
    sd = report["shell_deviation"]
    click.echo(
        f"shell deviation of the linear path: up to {sd['peak_mean']:.2f} sigma from the nearest endpoint shell "
        f"(mean over {sd['pairs']} pairs, at t={sd['peak_mean_t']:.2f}); max over pairs {sd['peak_max']:.2f} sigma"
    )
    sw = report["swap"]
    names = " / ".join([sw["metric"], "PSNR dB", *[k for k in sw["metrics"] if k not in ("perceptual", "psnr")]])
    extra_keys = [k for k in sw["metrics"] if k not in ("perceptual", "psnr")]
    click.echo(
        f"swap probe over {sw['anchors']} anchors ({names}): "
        + ", ".join(
            f"{h} {sw[h]['perceptual_mean']:.4f} / {sw[h]['psnr_mean']:.1f}"
            + "".join(f" / {sw[h][k + '_mean']:.4f}" for k in extra_keys)
            for h in ("neighbour", "radius_swapped", "direction_swapped", "radius_flattened")
        )
    )
    click.echo(f"wrote {path} and {len(figures)} figures")
