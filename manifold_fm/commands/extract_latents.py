"""``manifold-fm extract-latents``: encode an image folder or the built-in images into a sharded latent cache.

Shard across processes with accelerate: ``accelerate launch -m manifold_fm.cli extract-latents ...``; each process
encodes its shards (``k = rank, rank + processes, ...``) on its own device and the main process writes the manifest
once all are done (:func:`manifold_fm.data.latents.extract_latents`). A stopped run resumes with any number of
processes: rerun the same command.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..progress import progress_option
from ..threads import threads_option

_DTYPES = ("float32", "bfloat16", "float16")


def tokenizer_options(
    fn: Callable[..., Any] | None = None, *, device_default: str = "cpu", device_help: str | None = None
) -> Any:
    """The tokenizer-selection options shared by extract-latents, finetune-decoder and probe (as ``@tokenizer_options``
    or ``@tokenizer_options(device_default=..., device_help=...)``)."""
    if fn is None:
        return lambda f: tokenizer_options(f, device_default=device_default, device_help=device_help)
    options = [
        click.option(
            "--tokenizer",
            "tokenizer_spec",
            default="builtin",
            show_default=True,
            help="'builtin' (the tiny VAE) or a diffusers hub id / local VAE directory.",
        ),
        click.option("--subfolder", default=None, help="Subfolder of a diffusers repo holding the VAE (e.g. 'vae')."),
        click.option(
            "--kind",
            type=click.Choice(["kl", "flux2"]),
            default="kl",
            show_default=True,
            help="diffusers class: AutoencoderKL or AutoencoderKLFlux2.",
        ),
        click.option("--dtype", type=click.Choice(_DTYPES), default="float32", show_default=True),
        click.option("--device", default=device_default, show_default=True, help=device_help),
        click.option(
            "--normalization",
            type=click.Path(dir_okay=False),
            default=None,
            help="JSON latent statistics replacing the tokenizer's own constants.",
        ),
        click.option(
            "--vae-slicing", "vae_slicing", is_flag=True, help="diffusers VAE: encode/decode one image at a time."
        ),
        click.option(
            "--vae-tiling", "vae_tiling", is_flag=True, help="diffusers VAE: tiled encode/decode of big images."
        ),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def data_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--data",
            "data_spec",
            default="builtin",
            show_default=True,
            help="'builtin' or an image folder with one sub-folder per class (ImageNet layout).",
        ),
        click.option(
            "--split",
            type=click.Choice(["train", "test"]),
            default="train",
            show_default=True,
            help="Split of the built-in dataset.",
        ),
        click.option("--size", type=int, default=32, show_default=True, help="Image side (centre crop for folders)."),
        click.option("--per-class", type=int, default=None, help="Images per class of the built-in dataset."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def build_tokenizer(
    tokenizer_spec: str,
    subfolder: str | None,
    kind: str,
    dtype: str,
    device: str,
    normalization: str | None,
    vae_slicing: bool = False,
    vae_tiling: bool = False,
    **extra: Any,
) -> Any:
    """Load the tokenizer, turning our errors into one-line click errors."""
    import torch

    from ..manifolds import ManifoldError
    from ..tokenizers import load_tokenizer

    try:
        return load_tokenizer(
            tokenizer_spec,
            subfolder=subfolder,
            kind=kind,
            dtype=getattr(torch, dtype),
            device=device,
            normalization=normalization,
            slicing=vae_slicing,
            tiling=vae_tiling,
            **extra,
        )
    except (FileNotFoundError, ValueError, ManifoldError) as exc:
        raise click.ClickException(str(exc)) from None


def build_dataset(data_spec: str, split: str, size: int, per_class: int | None) -> Any:
    from ..data.image_folder import image_dataset

    # A missing folder is a problem with a file (exit status 1 from the CLI group); a size or count the dataset
    # refuses is a bad option value, a usage error (exit status 2).
    try:
        return image_dataset(data_spec, split=split, size=size, per_class=per_class)  # type: ignore[arg-type]
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--data: {exc}") from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--size/--per-class") from None


@click.command("extract-latents")
@tokenizer_options(
    device_default="auto",
    device_help="cpu, cuda, cuda:1; auto: this process's accelerate device (under accelerate launch each process "
    "its own GPU; cuda means the process's own GPU too).",
)
@data_options
@click.option(
    "--spherical",
    is_flag=True,
    help="Store tokens projected to radius sqrt(d) (SphericalTokenizer). Not needed for training: a "
    "spherical run reads a normal cache denormalised and projects it; a linear run refuses this one.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Cache directory (shards + manifest.json).",
)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--flip/--no-flip", default=True, show_default=True, help="Also store horizontally flipped copies.")
@click.option("--shard-size", type=int, default=4096, show_default=True, help="Source images per shard.")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue a partial cache.")
@click.option("--store-dtype", type=click.Choice(_DTYPES), default="float32", show_default=True)
@click.option(
    "--dataset-stats",
    is_flag=True,
    help="Normalise with per-channel mean/std computed over the dataset (saved as <out>/latent_stats.json "
    "and reused on resume) instead of the tokenizer's own constants. Runs trained on the cache record "
    "them and decode their samples with them.",
)
@click.option("--stats-items", type=int, default=10000, show_default=True, help="Images used by --dataset-stats.")
@click.option("--workers", type=int, default=0, show_default=True, help="Image-reading worker processes.")
@threads_option
@progress_option
def extract_latents(
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
    out_dir: Path,
    batch_size: int,
    flip: bool,
    shard_size: int,
    resume: bool,
    store_dtype: str,
    dataset_stats: bool,
    stats_items: int,
    workers: int,
) -> None:
    """Encode images once into sharded safetensors latents plus a manifest (resumable; bad images are counted)."""
    import torch
    from accelerate import PartialState

    from ..data.latents import extract_latents as run
    from ..training.trainer import cpu_only

    if dataset_stats and spherical:
        raise click.BadParameter("spherical latents are not renormalised", param_hint="--dataset-stats")
    state = PartialState(cpu=cpu_only(None if device in ("auto", "cuda") else device))
    if device == "auto" or (device == "cuda" and state.device.type == "cuda"):
        device = str(state.device)  # this process's own device
    tok = build_tokenizer(
        tokenizer_spec, subfolder, kind, dtype, device, normalization, vae_slicing, vae_tiling, spherical=spherical
    )
    dataset = build_dataset(data_spec, split, size, per_class)
    if dataset_stats:
        from ..tokenizers import LatentNormalization

        stats_path = out_dir / "latent_stats.json"
        if state.is_main_process and not (stats_path.is_file() and resume):
            from ..tokenizers import compute_channel_stats

            # the main process alone (bounded by --stats-items); the others wait for the file
            norm = compute_channel_stats(tok, dataset, max_items=stats_items, progress=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            norm.save(stats_path)
        state.wait_for_everyone()
        tok.with_normalization(LatentNormalization.load(stats_path))
    # User errors (a cache that does not match, unreadable statistics) become one line in the CLI group.
    with torch.no_grad():
        manifest = run(
            tok,
            dataset,
            out_dir,
            batch_size=batch_size,
            flip=flip,
            shard_size=shard_size,
            resume=resume,
            dtype=store_dtype,
            progress=state.is_main_process,
            num_workers=workers,
            rank=state.process_index,
            world_size=state.num_processes,
            barrier=state.wait_for_everyone,
            echo=lambda line: click.echo(line, err=True),
        )
    if not state.is_main_process:
        return
    import json

    info = json.loads(manifest.read_text())
    click.echo(
        f"{info['count']} latents of shape {info['latent_shape']} in {len(info['shards'])} shard(s); "
        f"{info['skipped']} unreadable image(s) skipped; manifest: {manifest}"
    )
