"""``SphericalTokenizer``: any tokenizer with every latent token projected onto the sphere of radius ``sqrt(d)``.

``encode(x) = projx(encode_raw_base(x))``: the base encoder's posterior mode, each token (the channel vector at
one spatial position) rescaled to ``sqrt(d) * z / |z|`` right at the encoder output. No further normalisation is
applied: the projected latents already have the scale of a ``d``-dimensional standard Gaussian token, and their
prior is ``TokenSpheres(d).random_base``. ``decode`` uses a decoder finetuned on projected latents (see
:mod:`manifold_fm.tokenizers.finetune`); without a finetuned state it falls back to the base decoder.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from manifold_fm.errors import InputError

from ..data.normalization import LatentNormalization
from ..manifolds import TokenSpheres
from .base import Tokenizer


def load_decoder_state(path: str | Path) -> dict[str, Tensor]:
    """Read a decoder state dict saved by ``finetune-decoder`` (safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"decoder state {path} does not exist; run `manifold-fm finetune-decoder` first")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"decoder state {path} is unreadable: {exc}") from None


class SphericalTokenizer(Tokenizer):
    """Frozen base encoder + per-token projection to radius ``sqrt(d)`` + (finetuned) decoder.

    Args:
        base: the tokenizer whose encoder is used (frozen) and whose decoder is copied.
        decoder_state: a state dict (or path to a safetensors file) for the copied decoder, e.g. from
            :func:`~manifold_fm.tokenizers.finetune.finetune_decoder`. ``None`` keeps the base decoder's weights.
    """

    def __init__(self, base: Tokenizer, decoder_state: Mapping[str, Tensor] | str | Path | None = None) -> None:
        self.base = base
        self.latent_channels = base.latent_channels
        self.downsample = base.downsample
        self.manifold = TokenSpheres(base.latent_channels, axis=1)
        self.normalization = LatentNormalization(kind="identity", meta={"projected": True})
        self.decoder = copy.deepcopy(base.decoder_module())
        self.finetuned = decoder_state is not None
        if isinstance(decoder_state, (str, Path)):
            decoder_state = load_decoder_state(decoder_state)
        if decoder_state is not None:
            try:
                self.decoder.load_state_dict(dict(decoder_state))
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise InputError(f"decoder state does not fit the base tokenizer's decoder: {first}") from None
        self.decoder.eval().requires_grad_(False)
        self.name = f"spherical({base.name}){'+ft' if self.finetuned else ''}"

    def project(self, latents: Tensor) -> Tensor:
        """Per-token projection ``sqrt(d) z / |z|`` along the channel axis."""
        return self.manifold.projx(latents)

    def encode_raw(self, images: Tensor) -> Tensor:
        return self.project(self.base.encode_raw(images))

    def decode_raw(self, latents: Tensor) -> Tensor:
        return self.decoder(latents).clamp(-1.0, 1.0)

    def decoder_module(self) -> nn.Module:
        return self.decoder

    def modules(self) -> Iterable[nn.Module]:
        return (*self.base.modules(), self.decoder)

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def describe(self) -> dict:
        out = super().describe()
        out["base"] = self.base.describe()
        out["radius"] = self.manifold.radius
        out["finetuned_decoder"] = self.finetuned
        return out
