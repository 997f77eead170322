"""``manifold-fm convert-vae``: an LDM-layout autoencoder checkpoint (VA-VAE, SD-VAE...) -> a diffusers
``AutoencoderKL`` folder, through diffusers' own LDM conversion (:mod:`manifold_fm.tokenizers.convert`)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("convert-vae")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="New diffusers folder (config.json + diffusion_pytorch_model.safetensors); must not exist or be empty.",
)
@click.option(
    "--sample-size", type=int, default=256, show_default=True, help="Training resolution (the config's sample_size)."
)
@click.option(
    "--scaling-factor",
    type=float,
    default=1.0,
    show_default=True,
    help="Latent scale stored in the config (SD-VAE: 0.18215); 1.0 leaves the latents as they are.",
)
@click.option("--shift-factor", type=float, default=None, help="Latent shift stored in the config.")
@click.option(
    "--latents-stats",
    type=click.Path(dir_okay=False),
    default=None,
    help="Per-channel 'mean' / 'std' file (LightningDiT's latents_stats.pt) stored as latents_mean / latents_std.",
)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow a pickled checkpoint that holds Python objects besides tensors (runs its code: only for files you "
    "trust).",
)
def convert_vae(
    checkpoint: str,
    out_dir: Path,
    sample_size: int,
    scaling_factor: float,
    shift_factor: float | None,
    latents_stats: str | None,
    dtype: str,
    trust_pickle: bool,
) -> None:
    """Convert CHECKPOINT (.ckpt / .pt / .safetensors with encoder.* / decoder.* keys, LDM layout, e.g. the
    LightningDiT VA-VAE f16d32) into a diffusers AutoencoderKL folder for --tokenizer."""
    import torch

    from ..tokenizers.convert import convert_ldm_vae

    try:
        summary = convert_ldm_vae(
            checkpoint,
            out_dir,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            latents_stats=latents_stats,
            dtype=getattr(torch, dtype),
            trust_pickle=trust_pickle,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    cfg = summary["config"]
    levels = ", ".join(
        f"{c}{'+attn' if t.startswith('Attn') else ''}"
        for c, t in zip(cfg["block_out_channels"], cfg["down_block_types"], strict=True)
    )
    click.echo(
        f"AutoencoderKL: {cfg['latent_channels']} latent channels, f{2 ** (len(cfg['block_out_channels']) - 1)}, "
        f"levels [{levels}], {summary['parameters'] / 1e6:.1f} M parameters in {summary['tensors']} tensors"
    )
    if summary["left_out"]:
        click.echo(f"left out (not part of the autoencoder): {', '.join(summary['left_out'])}")
    click.echo(f"wrote {summary['out']}")
