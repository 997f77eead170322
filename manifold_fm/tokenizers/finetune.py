"""Decoder finetuning for spherical tokenizers: the losses, discriminators and held-out report. The training itself
runs on the one trainer (:mod:`manifold_fm.training.decoder_finetune`); the encoder stays frozen, a copy of the
decoder and a discriminator learn to decode projected latents, as the SFM paper finetunes its tokenizers' decoders.

Per step, with ``x`` a batch of images, ``z = E(x)`` the frozen posterior mode and ``z~ = sqrt(d) z/|z|`` per
token (projected latents; ``z~ = z`` gives the paper's "FT-vanilla" control, the same recipe on raw latents)::

    L_rec = w_l1 * mean|D(z~) - x| + w_p * P(D(z~), x)
    L_G   = L_rec + ramp(step) * w_gan * a * (-mean Disc(D(z~)))
    L_D   = s_D * (mean relu(1 - Disc(x)) + mean relu(1 + Disc(D(z~))))      (hinge; only once step >= gan_start)

``P`` is LPIPS when local weights are given, else the named fallback distance. ``a`` is LDM's adaptive weight
(:func:`adaptive_gan_weight`): ``|grad_W L_rec| / (|grad_W L_adv| + 1e-4)`` at the decoder's last convolution
``W``, clamped to ``[0, 1e4]`` and detached, or 1 without adaptive weighting. ``ramp`` is 0 before ``gan_start`` and
1 from it on (LDM's ``adopt_weight``), or rises linearly over ``gan_warmup`` steps. The KL term is dropped (the
encoder is frozen); so are VA-VAE's DINOv2 alignment terms.

The default discriminator is LDM's (:class:`~manifold_fm.tokenizers.discriminator.NLayerDiscriminator`: 3 layers,
64 base channels, BatchNorm, 2.77 M parameters), trained alongside the decoder with ``s_D = 0.5`` as LDM's
``LPIPSWithDiscriminator``; it starts from random LDM initialisation or from a local checkpoint (the discriminator
saved in an LDM-layout autoencoder checkpoint, keys ``loss.discriminator.*``, loads directly). Adam
(``betas = (0.5, 0.9)``) for both, as LDM.

``discriminator="patch"`` selects the small 2-layer, 32-channel GroupNorm PatchGAN of the library's first finetune
(:class:`PatchDiscriminator`); the built-in default run pins it with that recipe (``gan_weight=0.1``,
``gan_start=steps // 2``, ``gan_warmup=max(1, steps // 10)``, ``grad_clip=1.0``, ``disc_loss_scale=1.0``).

:func:`compare_decoders` is the held-out report of ``manifold-fm finetune-decoder``: the original, FT-vanilla and
spherical decoders on their own latents (the paper's reconstruction table) and the decoder-swap control (the same
latents through every decoder).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from manifold_fm.errors import InputError

from ..data.guarded import GuardedItems, collate_guarded, load_image_batch
from ..manifolds import TokenSpheres
from .base import Tokenizer
from .discriminator import NLayerDiscriminator, discriminator_state, nlayer_discriminator_from_state
from .perceptual import GradientPyramidDistance, psnr, ssim
from .state_files import load_state_file


class PatchDiscriminator(nn.Module):
    """The library's first, small PatchGAN: stride-2 4x4 convolutions, GroupNorm, LeakyReLU; one logit per patch.

    Kept for the built-in default run (``discriminator="patch"``); the faithful default is
    :class:`~manifold_fm.tokenizers.discriminator.NLayerDiscriminator`."""

    def __init__(self, in_channels: int = 3, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = width
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        mods.append(nn.Conv2d(c, 1, 3, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def describe(self) -> dict[str, Any]:
        return {
            "class": "PatchDiscriminator (2-layer, 32-channel, GroupNorm)",
            "parameters": sum(p.numel() for p in self.parameters()),
        }


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """LDM's hinge loss of a discriminator: ``mean relu(1 - real) + mean relu(1 + fake)`` (each mean over its own
    logits)."""
    return torch.relu(1.0 - real_logits).mean() + torch.relu(1.0 + fake_logits).mean()


def adaptive_gan_weight(grad_rec: Tensor, grad_adv: Tensor) -> Tensor:
    """LDM's adaptive GAN weight ``|grad_rec| / (|grad_adv| + 1e-4)``, clamped to ``[0, 1e4]`` and detached, from the
    gradients of the reconstruction and adversarial losses at the decoder's last layer."""
    return (grad_rec.norm() / (grad_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def steps_for_epochs(epochs: float, dataset_size: int, batch_size: int) -> int:
    """Optimisation steps that show ``epochs * dataset_size`` images at ``batch_size``: ``ceil(E N / B)``."""
    if not (epochs > 0 and math.isfinite(epochs)):
        raise InputError(f"finetune epochs must be a positive number, got {epochs}")
    return max(1, math.ceil(epochs * dataset_size / batch_size))


def build_discriminator(
    kind: Literal["nlayer", "patch"] | nn.Module = "nlayer",
    *,
    layers: int | None = None,
    channels: int | None = None,
    norm: Literal["batch", "actnorm"] | None = None,
    init: str | Path | Mapping[str, Tensor] | None = None,
    seed: int = 0,
    trust_pickle: bool = False,
) -> nn.Module:
    """The discriminator of a finetune (see the module docstring).

    ``kind="nlayer"``: LDM's PatchGAN, ``layers`` x ``channels`` (default 3 x 64) with ``norm`` (default BatchNorm);
    with ``init`` (a checkpoint path or a state dict, LDM keys accepted) its architecture is read from ``init`` and
    explicit ``layers`` / ``channels`` / ``norm`` must agree. ``kind="patch"``: :class:`PatchDiscriminator`.
    A module is used as given (deep-copied). Random initialisation is seeded by ``seed`` without touching the
    global RNG.
    """
    if isinstance(kind, nn.Module):
        if init is not None:
            raise InputError("pass either a discriminator module or disc_init, not both")
        return copy.deepcopy(kind)
    if kind == "patch":
        if init is not None or layers is not None or channels is not None or norm is not None:
            raise InputError("the 'patch' discriminator has a fixed architecture and no checkpoint; use 'nlayer'")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return PatchDiscriminator()
    if kind != "nlayer":
        raise InputError(f"discriminator must be 'nlayer' or 'patch', got {kind!r}")
    if init is not None:
        if isinstance(init, (str, Path)):
            where, obj = str(init), load_state_file(init, "discriminator checkpoint", trust_pickle=trust_pickle)
        else:
            where, obj = "the given state", dict(init)
        state = discriminator_state(obj)
        if not state:
            raise InputError(
                f"discriminator checkpoint {where} has no 'main.*' / 'loss.discriminator.main.*' tensors "
                "(an LDM-layout autoencoder checkpoint or a saved NLayerDiscriminator state dict is expected)"
            )
        disc = nlayer_discriminator_from_state(state)
        wanted = {"layers": layers, "channels": channels, "norm": norm}
        found = {"layers": disc.layers, "channels": disc.base_channels, "norm": disc.norm}
        clash = [f"{k} {wanted[k]} (checkpoint: {found[k]})" for k in wanted if wanted[k] not in (None, found[k])]
        if clash:
            raise InputError(f"discriminator checkpoint {where} does not match the requested " + ", ".join(clash))
        return disc
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NLayerDiscriminator(3, channels or 64, layers or 3, norm or "batch")


DECODERS = ("original", "ft_vanilla", "spherical")
LATENTS = ("raw_latents", "projected_latents")
# The latents each decoder was trained for: the paper's reconstruction table reads these cells.
OWN_LATENTS = {"original": "raw_latents", "ft_vanilla": "raw_latents", "spherical": "projected_latents"}


def _image_chunks(
    dataset: Dataset, indices: Sequence[int], batch_size: int, num_workers: int
) -> Iterator[tuple[Tensor, int]]:
    """``(images, skipped)`` chunks of ``dataset[indices]`` in order; unreadable images are left out and counted."""
    if num_workers <= 0:
        for start in range(0, len(indices), batch_size):
            idx = list(indices[start : start + batch_size])
            try:
                images = load_image_batch(dataset, idx)
            except ValueError:  # none readable
                yield torch.zeros(0), len(idx)
                continue
            yield images, len(idx) - int(images.shape[0])
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(
        GuardedItems(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_guarded,
    )
    for images, _, _, bad in loader:
        yield (torch.stack(images) if images else torch.zeros(0)), len(bad)


@torch.no_grad()
def compare_decoders(
    tokenizer: Tokenizer,
    decoder_states: Mapping[str, Mapping[str, Tensor] | None],
    dataset: Dataset,
    indices: Sequence[int],
    *,
    perceptual: nn.Module | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    on_batch: Callable[[str, Tensor, Tensor], None] | None = None,
    own_latents: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Decoders side by side on held-out images: every decoder on raw and on projected latents of the same images.

    Args:
        tokenizer: the base tokenizer (its encoder gives the raw latents ``z``; projected ones are
            ``sqrt(d) z / |z|`` per token; its decoder is the ``original``).
        decoder_states: name -> finetuned decoder state (``None``: the original decoder), e.g.
            ``{"original": None, "ft_vanilla": s_raw, "spherical": s_proj}``.
        dataset, indices: the held-out images (``indices`` spread over the dataset, so every class is present).
        perceptual: the image distance (default: the named fallback).
        on_batch: called as ``on_batch(key, reconstructions, images)`` for each chunk and each
            ``"<decoder>/<latents>"`` key (reconstructions clamped to ``[-1, 1]``); rFID collects images with it.
        own_latents: the latents (``raw_latents`` / ``projected_latents``) each decoder was trained for, by name,
            besides :data:`OWN_LATENTS`; they pick its row of ``reconstruction``.

    Returns:
        ``{"metrics": {"<decoder>_decoder/<latents>": {psnr, ssim, perceptual}}, "reconstruction": {decoder: the
        metrics on the latents it was trained for}, "swap_control": {latents: {decoder: metrics}}, "images": count,
        "skipped": unreadable count, "perceptual_metric": name}``. Decoders whose latents are known (``own_latents``,
        :data:`OWN_LATENTS`) get their row in ``reconstruction``; others appear in the swap control only.
    """
    from .spherical import SphericalTokenizer

    if not decoder_states:
        raise InputError("compare_decoders needs at least one decoder")
    if len(indices) == 0:
        raise InputError("compare_decoders needs at least one held-out image")
    perceptual = (perceptual or GradientPyramidDistance()).to(tokenizer.device)
    manifold = TokenSpheres(tokenizer.latent_channels, axis=1)
    decode: dict[str, Callable[[Tensor], Tensor]] = {}
    for name, state in decoder_states.items():
        if state is None:
            decode[name] = tokenizer.decode_raw
        else:
            decode[name] = SphericalTokenizer(tokenizer, state).decode_raw
    values: dict[str, dict[str, list[Tensor]]] = {}
    count, skipped = 0, 0
    for images, bad in _image_chunks(dataset, indices, batch_size, num_workers):
        skipped += bad
        if images.numel() == 0:
            continue
        x = images.to(tokenizer.device).float()
        raw = tokenizer.encode_raw(x.to(tokenizer.dtype))
        lat = {"raw_latents": raw, "projected_latents": manifold.projx(raw.float()).to(raw.dtype)}
        for name, fn in decode.items():
            for lname, z in lat.items():
                key = f"{name}_decoder/{lname}"
                rec = fn(z).float().clamp(-1, 1)
                vals = values.setdefault(key, {"psnr": [], "ssim": [], "perceptual": []})
                vals["psnr"].append(psnr(rec, x).cpu())
                vals["ssim"].append(ssim(rec, x).cpu())
                vals["perceptual"].append(perceptual(rec, x).float().cpu())
                if on_batch is not None:
                    on_batch(key, rec, x)
        count += int(x.shape[0])
    if count == 0:
        raise InputError(f"none of the {len(indices)} held-out images could be read")
    metrics = {k: {m: float(torch.cat(v).double().mean()) for m, v in d.items()} for k, d in values.items()}
    own = {**OWN_LATENTS, **(own_latents or {})}
    return {
        "metrics": metrics,
        "reconstruction": {name: metrics[f"{name}_decoder/{own[name]}"] for name in decoder_states if name in own},
        "swap_control": {
            lname: {name: metrics[f"{name}_decoder/{lname}"] for name in decoder_states} for lname in LATENTS
        },
        "images": count,
        "skipped": skipped,
        "perceptual_metric": getattr(perceptual, "name", type(perceptual).__name__),
    }


def spread_indices(n: int, k: int) -> list[int]:
    """``min(k, n)`` distinct indices spread evenly over ``range(n)`` (class folders are contiguous, so the first
    ``k`` items would all be of one class)."""
    k = min(k, n)
    if k <= 0:
        return []
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)}) if k > 1 else [0]
