"""``manifold-fm probe``: latent-geometry diagnostics and the component-swap probe, as JSON plus PNG figures."""

from __future__ import annotations

from pathlib import Path

import click

from ..atomic import write_json_atomic
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
@click.option("--max-pairs", type=int, default=64, show_default=True, help="Anchor/neighbour pairs of the swap probe.")
@click.option("--lpips-vgg", type=click.Path(dir_okay=False), default=None)
@click.option("--lpips-lin", type=click.Path(dir_okay=False), default=None)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the Gaussian prior samples.")
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
    max_pairs: int,
    lpips_vgg: str | None,
    lpips_lin: str | None,
    seed: int,
) -> None:
    """Token-norm statistics (raw, normalised, Gaussian), path diagnostics (linear/polar/slerp) and swap probe."""
    import torch

    from ..eval.geometry import path_diagnostics, token_norm_stats, token_norms
    from ..eval.probes import component_swap_probe, plot_probe_report
    from ..tokenizers.perceptual import perceptual_distance

    if num < 2 or t_points < 2:
        raise click.BadParameter("--num and --t-points must be at least 2")
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
        prior = torch.randn(normed.shape, generator=g)
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
            "paths": path_diagnostics(prior, normed, torch.linspace(0, 1, t_points)),
        }
        try:
            report["swap"] = component_swap_probe(tok, images, labels, perceptual=perceptual, max_pairs=max_pairs)
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
    sw = report["swap"]
    click.echo(
        "swap probe ("
        + sw["metric"]
        + "): "
        + ", ".join(
            f"{h} {sw[h]['perceptual_mean']:.4f} / {sw[h]['psnr_mean']:.1f} dB"
            for h in ("neighbour", "radius_swapped", "direction_swapped", "radius_flattened")
        )
    )
    click.echo(f"wrote {path} and {len(figures)} figures")
