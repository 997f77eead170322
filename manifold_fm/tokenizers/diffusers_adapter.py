"""Adapters for diffusers autoencoders: ``AutoencoderKL`` (SD-VAE, FLUX.1, REPA-E E2E VAEs) and
``AutoencoderKLFlux2`` (FLUX.2).

Latents are the posterior mode ``encode(x).latent_dist.mode()`` at the VAE's own resolution: for FLUX.2 that is its
32 channels at 8x downsampling, *before* the pipeline's 2x2 patchify. Normalisation follows each pipeline:

- ``AutoencoderKL``: ``(z - shift_factor) * scaling_factor``, or, when the config has ``latents_mean`` /
  ``latents_std``, ``(z - mean_c) * scaling_factor / std_c`` per channel;
- ``AutoencoderKLFlux2``: the pipeline normalises the *patchified* latents with the VAE's batch-norm running
  statistics, ``(p - running_mean) / sqrt(running_var + eps)`` over ``4 * 32`` channels. Patchified channel
  ``4 c + 2 i + j`` is channel ``c`` at sub-pixel ``(i, j)``, so on the unpatchified grid this is a per-channel
  statistic with a 2x2 periodic pattern, which :class:`LatentNormalization` represents exactly as ``(C, 2, 2)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from manifold_fm.errors import InputError
from manifold_fm.hub import local_or_repo_id, offline_snapshot

from ..data.normalization import LatentNormalization
from .base import Tokenizer


class DiffusersDecoder(nn.Module):
    """Raw latents -> images through ``post_quant_conv`` (if any) then the VAE decoder (unclamped)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)
        self.decoder = vae.decoder

    def forward(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def _vae_classes() -> dict[str, type]:
    import diffusers

    classes: dict[str, type] = {"kl": diffusers.AutoencoderKL}
    flux2 = getattr(diffusers, "AutoencoderKLFlux2", None)
    if flux2 is not None:
        classes["flux2"] = flux2
    return classes


def own_normalization(vae: nn.Module, kind: str) -> LatentNormalization:
    """The latent normalisation the VAE's pipeline uses (see the module docstring)."""
    cfg = vae.config
    if kind == "flux2":
        bn = vae.bn
        c = cfg.latent_channels
        ph, pw = tuple(cfg.patch_size)
        mean = bn.running_mean.detach().double().cpu().view(c, ph, pw)
        std = (bn.running_var.detach().double().cpu() + cfg.batch_norm_eps).sqrt().view(c, ph, pw)
        return LatentNormalization(shift=mean, scale=1.0 / std, kind="batchnorm", meta={"patch_size": [ph, pw]})
    scaling = float(cfg.scaling_factor) if cfg.scaling_factor is not None else 1.0
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float64)
        std = torch.tensor(cfg.latents_std, dtype=torch.float64)
        return LatentNormalization(shift=mean, scale=scaling / std, kind="constants")
    shift = float(cfg.shift_factor) if getattr(cfg, "shift_factor", None) is not None else 0.0
    return LatentNormalization(shift=shift, scale=scaling, kind="constants")


def diffusers_tokenizer_name(name_or_path: str | Path, subfolder: str | None = None, kind: str = "kl") -> str:
    """The ``name`` of the tokenizer :meth:`DiffusersTokenizer.from_pretrained` loads with these arguments (known
    without loading it): ``diffusers-<kind>:<name_or_path>[/<subfolder>]``."""
    return f"diffusers-{kind}:{name_or_path}" + (f"/{subfolder}" if subfolder else "")


class DiffusersTokenizer(Tokenizer):
    """A diffusers VAE behind the :class:`Tokenizer` interface (deterministic posterior mode)."""

    def __init__(
        self,
        vae: nn.Module,
        kind: Literal["kl", "flux2"] = "kl",
        name: str = "diffusers",
        normalization: LatentNormalization | None = None,
    ) -> None:
        self.vae = vae
        self.kind = kind
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.normalization = normalization or own_normalization(vae, kind)
        self.name = name
        self._decoder = DiffusersDecoder(vae)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        subfolder: str | None = None,
        kind: Literal["kl", "flux2"] = "kl",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        slicing: bool = False,
        tiling: bool = False,
        normalization: LatentNormalization | str | Path | None = None,
        **kwargs: Any,
    ) -> DiffusersTokenizer:
        """Load ``AutoencoderKL`` (``kind="kl"``) or ``AutoencoderKLFlux2`` (``kind="flux2"``) with
        ``from_pretrained`` from a hub id or a local directory (optionally its ``subfolder``). A path that does not
        exist is reported as a missing folder at once; a hub id while the Hub is unreachable is read from the Hugging
        Face cache or fails at once (:mod:`manifold_fm.hub`).

        ``normalization`` overrides the VAE's own constants: a :class:`LatentNormalization` or a JSON file written by
        :meth:`LatentNormalization.save` (e.g. per-channel dataset statistics stored next to the tokenizer).
        ``slicing`` / ``tiling`` enable diffusers' memory savers. Extra keyword arguments go to ``from_pretrained``.
        """
        if kind not in ("kl", "flux2"):
            raise InputError(f"diffusers tokenizer kind must be 'kl' or 'flux2', got {kind!r}")
        source = local_or_repo_id(name_or_path, "tokenizer")  # a missing local folder fails here, not on the network
        classes = _vae_classes()
        if kind not in classes:
            import diffusers

            raise InputError(
                f"diffusers {diffusers.__version__} has no AutoencoderKLFlux2; upgrade diffusers to load FLUX.2's VAE"
            )
        vae_cls = classes[kind]
        if isinstance(source, str) and not kwargs.get("local_files_only"):
            # With the Hub out of reach, its cached snapshot (a local folder) or one line, instead of five retries.
            cached = offline_snapshot(
                source, "tokenizer", cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision")
            )
            source = source if cached is None else cached
        if isinstance(source, Path) and not (source / (subfolder or "") / "config.json").is_file():
            raise FileNotFoundError(
                f"{source / (subfolder or '')} has no config.json; "
                "pass the VAE directory (or its parent with subfolder=)"
            )
        try:
            with warnings.catch_warnings():  # diffusers passes huggingface_hub an argument it has deprecated
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
                vae = vae_cls.from_pretrained(str(source), subfolder=subfolder, torch_dtype=dtype, **kwargs)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FileNotFoundError(f"cannot load {vae_cls.__name__} from {name_or_path!s}: {first}") from None
        vae = vae.to(device).eval().requires_grad_(False)
        if slicing:
            vae.enable_slicing()
        if tiling:
            vae.enable_tiling()
        if isinstance(normalization, (str, Path)):
            normalization = LatentNormalization.load(normalization)
        return cls(
            vae, kind=kind, name=diffusers_tokenizer_name(name_or_path, subfolder, kind), normalization=normalization
        )

    def encode_raw(self, images: Tensor) -> Tensor:
        return self.vae.encode(images).latent_dist.mode()

    def decode_raw(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents).sample.clamp(-1.0, 1.0)

    def decoder_module(self) -> nn.Module:
        return self._decoder

    def modules(self) -> Iterable[nn.Module]:
        return (self.vae,)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["kind"] = self.kind
        out["class"] = type(self.vae).__name__
        return out
