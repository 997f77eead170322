"""Tokenizers: the interface, diffusers adapters, the built-in tiny VAE, spherical projection, the decoder finetune's
losses, discriminators and held-out report (its training is
:func:`manifold_fm.training.decoder_finetune.finetune_decoder`, on the one trainer).

``DiffusersTokenizer`` is imported lazily (diffusers is heavy and optional).
"""

from __future__ import annotations

from typing import Any

from ..data.normalization import LatentNormalization
from .base import Tokenizer, compute_channel_stats
from .spherical import SphericalTokenizer, load_decoder_state
from .tiny_vae import TinyVAE, TinyVAETokenizer, builtin_tokenizer, load_tiny_vae, save_tiny_vae, train_tiny_vae

__all__ = [
    "DiffusersTokenizer",
    "LatentNormalization",
    "SphericalTokenizer",
    "TinyVAE",
    "TinyVAETokenizer",
    "Tokenizer",
    "builtin_tokenizer",
    "compute_channel_stats",
    "load_decoder_state",
    "load_tiny_vae",
    "load_tokenizer",
    "save_tiny_vae",
    "train_tiny_vae",
]


def __getattr__(name: str) -> Any:
    if name == "DiffusersTokenizer":
        from .diffusers_adapter import DiffusersTokenizer

        return DiffusersTokenizer
    raise AttributeError(f"module 'manifold_fm.tokenizers' has no attribute {name!r}")


def load_tokenizer(
    spec: str,
    *,
    subfolder: str | None = None,
    kind: str = "kl",
    dtype: Any = None,
    device: Any = "cpu",
    normalization: Any = None,
    spherical: bool = False,
    decoder_state: Any = None,
    progress: bool = True,
    slicing: bool = False,
    tiling: bool = False,
) -> Tokenizer:
    """A tokenizer from a CLI-style spec: ``"builtin"`` (the tiny VAE) or a diffusers hub id / local directory.

    ``normalization`` (a :class:`LatentNormalization` or a JSON path) replaces the tokenizer's own constants;
    ``spherical=True`` wraps it in :class:`SphericalTokenizer` with the optional finetuned ``decoder_state``;
    ``slicing`` / ``tiling`` turn on diffusers' memory savers (ignored for the built-in tokenizer).
    """
    import torch

    dtype = dtype or torch.float32
    if spec == "builtin":
        tok: Tokenizer = builtin_tokenizer(progress=progress).to(device=device, dtype=dtype)
    else:
        from .diffusers_adapter import DiffusersTokenizer

        tok = DiffusersTokenizer.from_pretrained(
            spec, subfolder=subfolder, kind=kind, dtype=dtype, device=device, slicing=slicing, tiling=tiling
        )
    if normalization is not None:
        norm = normalization
        if not isinstance(norm, LatentNormalization):
            norm = LatentNormalization.load(normalization)
        tok.with_normalization(norm)
    if spherical or decoder_state is not None:
        tok = SphericalTokenizer(tok, decoder_state)
        tok.decoder.to(device=device, dtype=dtype)
    return tok.eval()
