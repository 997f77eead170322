"""Decoder finetuning for spherical tokenizers: encoder frozen, decoder (and discriminator) trained to decode
projected latents, as the SFM paper finetunes its tokenizers' decoders.

Per step, with ``x`` a batch of images, ``z = E(x)`` the frozen posterior mode and ``z~ = sqrt(d) z/|z|`` per
token (``project=True``; ``z~ = z`` gives the paper's "FT-vanilla" control, the same recipe on raw latents)::

    L_rec = w_l1 * mean|D(z~) - x| + w_p * P(D(z~), x)
    L_G   = L_rec + ramp(step) * w_gan * a * (-mean Disc(D(z~)))
    L_D   = s_D * (mean relu(1 - Disc(x)) + mean relu(1 + Disc(D(z~))))      (hinge; only once step >= gan_start)

``P`` is LPIPS when local weights are given, else the named fallback distance. ``a`` is LDM's adaptive weight
(``calculate_adaptive_weight``): ``|grad_W L_rec| / (|grad_W L_adv| + 1e-4)`` at the decoder's last convolution
``W``, clamped to ``[0, 1e4]`` and detached, or 1 with ``adaptive_gan_weight=False``. ``ramp`` is 0 before
``gan_start`` and 1 from it on (LDM's ``adopt_weight``), or rises linearly over ``gan_warmup`` steps. The KL term is
dropped (the encoder is frozen); so are VA-VAE's DINOv2 alignment terms.

The default discriminator is LDM's (:class:`~manifold_fm.tokenizers.discriminator.NLayerDiscriminator`: 3 layers,
64 base channels, BatchNorm, 2.77 M parameters), trained alongside the decoder with ``s_D = 0.5`` as LDM's
``LPIPSWithDiscriminator``; it starts from random LDM initialisation or from a local checkpoint (``disc_init``; the
discriminator saved in an LDM-layout autoencoder checkpoint, keys ``loss.discriminator.*``, loads directly). Adam
(``betas = (0.5, 0.9)``) for both, as LDM.

``discriminator="patch"`` selects the small 2-layer, 32-channel GroupNorm PatchGAN of the library's first finetune
(:class:`PatchDiscriminator`); the built-in default run pins it with that recipe (``gan_weight=0.1``,
``gan_start=steps // 2``, ``gan_warmup=max(1, steps // 10)``, ``grad_clip=1.0``, ``disc_loss_scale=1.0``) so its
numbers do not move.

:func:`compare_decoders` is the held-out report of ``manifold-fm finetune-decoder``: the original, FT-vanilla and
spherical decoders on their own latents (the paper's reconstruction table) and the decoder-swap control (the same
latents through every decoder).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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


@dataclass
class FinetuneResult:
    """What :func:`finetune_decoder_and_discriminator` returns: float32 CPU state dicts and a JSON-safe report."""

    decoder_state: dict[str, Tensor]
    discriminator_state: dict[str, Tensor]
    report: dict[str, Any]


def _worker_batches(
    dataset: Dataset, steps: int, batch_size: int, g: torch.Generator, num_workers: int
) -> Iterator[Tensor]:
    """Image batches drawn with replacement, read by ``num_workers`` DataLoader processes (unreadable images are
    dropped from their batch; a batch with none readable is skipped)."""
    from torch.utils.data import DataLoader, RandomSampler

    n = len(dataset)  # type: ignore[arg-type]
    sampler = RandomSampler(range(n), replacement=True, num_samples=steps * batch_size * 2, generator=g)
    loader = DataLoader(
        GuardedItems(dataset, range(n)),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_guarded,
        persistent_workers=True,
    )
    for images, _, _, _ in loader:
        if images:
            yield torch.stack(images)


@torch.no_grad()
def reconstruction_metrics(
    decode: Callable[[Tensor], Tensor], latents: Tensor, images: Tensor, perceptual: nn.Module, batch_size: int = 64
) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and perceptual distance of ``decode(latents)`` against ``images``."""
    p_vals, s_vals, d_vals = [], [], []
    for start in range(0, latents.shape[0], batch_size):
        z = latents[start : start + batch_size]
        x = images[start : start + batch_size].to(z.device)
        rec = decode(z).float().clamp(-1, 1)
        p_vals.append(psnr(rec, x.float()))
        s_vals.append(ssim(rec, x.float()))
        d_vals.append(perceptual(rec, x.float()).float())
    return {
        "psnr": float(torch.cat(p_vals).mean()),
        "ssim": float(torch.cat(s_vals).mean()),
        "perceptual": float(torch.cat(d_vals).mean()),
    }


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


def finetune_decoder_and_discriminator(
    tokenizer: Tokenizer,
    dataset: Dataset,
    steps: int | None = None,
    *,
    epochs: float | None = None,
    batch_size: int = 16,
    lr: float = 1e-4,
    project: bool = True,
    perceptual: nn.Module | None = None,
    l1_weight: float = 1.0,
    perceptual_weight: float = 1.0,
    gan_weight: float = 0.5,
    gan_start: int | None = None,
    gan_warmup: int = 0,
    disc_lr: float | None = None,
    adaptive_gan_weight: bool = True,
    discriminator: Literal["nlayer", "patch"] | nn.Module = "nlayer",
    disc_layers: int | None = None,
    disc_channels: int | None = None,
    disc_norm: Literal["batch", "actnorm"] | None = None,
    disc_init: str | Path | Mapping[str, Tensor] | None = None,
    disc_loss_scale: float = 0.5,
    grad_clip: float | None = None,
    trust_pickle: bool = False,
    num_workers: int = 0,
    eval_dataset: Dataset | None = None,
    eval_items: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> FinetuneResult:
    """Finetune a copy of ``tokenizer``'s decoder together with a discriminator (see the module docstring).

    Args:
        tokenizer: any :class:`Tokenizer`; its encoder and decoder stay untouched.
        dataset: yields ``(image, label)``; batches are drawn with replacement from a generator seeded by ``seed``.
        steps / epochs: the length, exactly one of them: optimisation steps, or passes over ``dataset``
            (``steps = ceil(epochs * len(dataset) / batch_size)``, images drawn with replacement).
        project: train on projected latents (spherical tokenizer) or raw ones (the FT-vanilla control).
        perceptual: an image distance module; default :class:`GradientPyramidDistance` (the weightless fallback).
        gan_weight: LDM's ``disc_weight`` (0.5 in the LDM / VA-VAE KL-autoencoder configs).
        gan_start: first step of the adversarial terms (generator and discriminator); default 0 with a
            discriminator checkpoint (``disc_init``: it is already trained), else ``steps // 2``.
        gan_warmup: steps over which the generator's GAN weight rises linearly from ``gan_start``; 0 (LDM) switches
            it on at once.
        discriminator, disc_layers, disc_channels, disc_norm, disc_init: see :func:`build_discriminator`.
        disc_loss_scale: ``s_D`` of the hinge loss (LDM: 0.5).
        grad_clip: max gradient norm of the decoder's update (LDM: none).
        trust_pickle: allow a pickled ``disc_init`` file that holds Python objects (runs its code).
        num_workers: DataLoader processes reading training images (image folders on a GPU machine); 0 reads them
            in this process (the built-in dataset renders whole batches at once).
        eval_dataset / eval_items: the quick report on the first ``eval_items`` items of ``eval_dataset`` (default:
            of ``dataset``); ``eval_items=0`` skips it (``manifold-fm finetune-decoder`` reports with
            :func:`compare_decoders` instead).

    Returns:
        a :class:`FinetuneResult`: the finetuned decoder's and discriminator's float32 CPU state dicts and a JSON-safe
        report with the settings, final losses and a ``"metrics"`` mapping
        ``"<decoder>/<latents>" -> {psnr, ssim, perceptual}``.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise InputError("finetune dataset is empty")
    if batch_size < 1:
        raise InputError(f"finetune batch size must be >= 1, got {batch_size}")
    if (steps is None) == (epochs is None):
        raise InputError("give the finetune length as steps or as epochs (exactly one of them)")
    if epochs is not None:
        steps = steps_for_epochs(epochs, n, batch_size)
    assert steps is not None
    if steps < 0:
        raise InputError(f"finetune steps must be >= 0, got {steps}")
    if gan_warmup < 0 or (gan_start is not None and gan_start < 0):
        raise InputError(f"gan_start and gan_warmup must be >= 0, got {gan_start} and {gan_warmup}")
    device = tokenizer.device
    tokenizer.eval().requires_grad_(False)
    manifold = TokenSpheres(tokenizer.latent_channels, axis=1)
    perceptual = (perceptual or GradientPyramidDistance()).to(device)
    perceptual.requires_grad_(False)
    if gan_start is None:
        gan_start = 0 if disc_init is not None else steps // 2
    warm = max(1, gan_warmup)

    def latents_of(x: Tensor, proj: bool) -> Tensor:
        with torch.no_grad():
            z = tokenizer.encode_raw(x.to(device, tokenizer.dtype)).float()
        return manifold.projx(z) if proj else z

    decoder = copy.deepcopy(tokenizer.decoder_module()).float().to(device).train().requires_grad_(True)
    convs = [q for q in decoder.parameters() if q.ndim == 4]
    if not convs and adaptive_gan_weight and gan_weight > 0:
        raise InputError("adaptive GAN weighting needs a convolutional decoder; pass adaptive_gan_weight=False")
    last_conv = convs[-1] if convs else None
    disc = build_discriminator(
        discriminator,
        layers=disc_layers,
        channels=disc_channels,
        norm=disc_norm,
        init=disc_init,
        seed=seed,
        trust_pickle=trust_pickle,
    )
    disc = disc.float().to(device).train()
    opt_g = torch.optim.AdamW(decoder.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=disc_lr or lr, betas=(0.5, 0.9), weight_decay=0.0)
    gan_on = gan_weight > 0 and gan_start < steps
    min_side = getattr(disc, "min_image_size", None)

    g = torch.Generator().manual_seed(seed)
    from tqdm.auto import tqdm

    batches = _worker_batches(dataset, steps, batch_size, g, num_workers) if num_workers > 0 else None
    bar = tqdm(range(steps), disable=not progress, desc="finetune decoder" + (" (projected)" if project else " (raw)"))
    last: dict[str, float] = {}
    for step in bar:
        if batches is not None:
            x = next(batches).to(device).float()
        else:
            idx = torch.randint(0, n, (batch_size,), generator=g).tolist()
            x = load_image_batch(dataset, idx).to(device).float()
        if step == 0 and gan_on and callable(min_side) and min(x.shape[-2:]) < min_side():
            raise InputError(
                f"images of {tuple(x.shape[-2:])} px are too small for the {getattr(disc, 'layers', '?')}-layer "
                "discriminator "
                f"(it needs >= {min_side()} px); use fewer discriminator layers"
            )
        z = latents_of(x, project)
        rec = decoder(z)
        l1 = (rec - x).abs().mean()
        p = perceptual(rec, x).mean()
        loss = l1_weight * l1 + perceptual_weight * p
        ramp = 0.0 if step < gan_start else min(1.0, (step - gan_start + 1) / warm)
        adv = torch.zeros((), device=device)
        a = 1.0
        if ramp > 0 and gan_weight > 0:
            disc.requires_grad_(False)
            adv = -disc(rec).mean()
            if adaptive_gan_weight:
                g_rec = torch.autograd.grad(loss, last_conv, retain_graph=True)[0]
                g_adv = torch.autograd.grad(adv, last_conv, retain_graph=True)[0]
                a = float((g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4))
            loss = loss + ramp * gan_weight * a * adv
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), grad_clip)
        opt_g.step()
        d_loss = torch.zeros((), device=device)
        if step >= gan_start and gan_weight > 0:
            disc.requires_grad_(True)
            hinge = torch.relu(1 - disc(x)).mean() + torch.relu(1 + disc(rec.detach())).mean()
            d_loss = disc_loss_scale * hinge if disc_loss_scale != 1.0 else hinge
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        last = {
            "l1": l1.item(),
            "perceptual": p.item(),
            "adv": adv.item(),
            "disc": d_loss.item(),
            "ramp": ramp,
            "gan_scale": a,
        }
        if not all(math.isfinite(v) for v in last.values()):
            raise FloatingPointError(f"decoder finetuning diverged at step {step} (losses {last}); lower the lr")
        if step % 10 == 0:
            bar.set_postfix(l1=f"{last['l1']:.4f}", p=f"{last['perceptual']:.4f}")
    decoder.eval().requires_grad_(False)
    disc.eval().requires_grad_(False)

    metrics: dict[str, dict[str, float]] = {}
    m = 0
    if eval_items > 0:
        # Quick held-out report: the first eval_items items of eval_dataset.
        ev = eval_dataset if eval_dataset is not None else dataset
        m = min(eval_items, len(ev))  # type: ignore[arg-type]
        images = load_image_batch(ev, list(range(m))).float()
        m = int(images.shape[0])  # unreadable images are left out
        z_raw = latents_of(images, False)
        z_proj = manifold.projx(z_raw)
        base_decode = tokenizer.decode_raw

        def ft_decode(z: Tensor) -> Tensor:
            return decoder(z.float())

        target = "projected_latents" if project else "raw_latents"
        metrics = {
            "original_decoder/raw_latents": reconstruction_metrics(
                base_decode, z_raw.to(tokenizer.dtype), images, perceptual
            ),
            "original_decoder/projected_latents": reconstruction_metrics(
                base_decode, z_proj.to(tokenizer.dtype), images, perceptual
            ),
            f"finetuned_decoder/{target}": reconstruction_metrics(
                ft_decode, z_proj if project else z_raw, images, perceptual
            ),
        }
    describe = getattr(disc, "describe", None)
    report: dict[str, Any] = {
        "tokenizer": tokenizer.name,
        "project": project,
        "steps": steps,
        "epochs": steps * batch_size / n,
        "dataset_size": n,
        "batch_size": batch_size,
        "lr": lr,
        "disc_lr": disc_lr or lr,
        "weights": {
            "l1": l1_weight,
            "perceptual": perceptual_weight,
            "gan": gan_weight,
            "adaptive_gan_weight": adaptive_gan_weight,
        },
        "gan_start": gan_start,
        "gan_warmup": gan_warmup,
        "disc_loss_scale": disc_loss_scale,
        "grad_clip": grad_clip,
        "discriminator": describe() if callable(describe) else {"class": type(disc).__name__},
        "disc_init": str(disc_init) if isinstance(disc_init, (str, Path)) else ("state" if disc_init else None),
        "perceptual_metric": getattr(perceptual, "name", type(perceptual).__name__),
        "eval_items": m,
        "final_losses": last,
        "metrics": metrics,
        "rfid": None,
        "rfid_note": "rFID needs local Inception weights (torch-fidelity); not computed by finetune_decoder",
    }
    state = {k: v.detach().float().cpu().contiguous() for k, v in decoder.state_dict().items()}
    disc_state = {k: v.detach().cpu().contiguous() for k, v in disc.state_dict().items()}
    return FinetuneResult(state, disc_state, report)


def finetune_decoder(
    tokenizer: Tokenizer, dataset: Dataset, steps: int | None = None, **kwargs: Any
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Finetune a copy of ``tokenizer``'s decoder (see the module docstring); returns ``(decoder_state, report)``.

    The arguments are those of :func:`finetune_decoder_and_discriminator`, which also returns the discriminator.
    """
    result = finetune_decoder_and_discriminator(tokenizer, dataset, steps, **kwargs)
    return result.decoder_state, result.report


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

    Returns:
        ``{"metrics": {"<decoder>_decoder/<latents>": {psnr, ssim, perceptual}}, "reconstruction": {decoder: the
        metrics on the latents it was trained for}, "swap_control": {latents: {decoder: metrics}}, "images": count,
        "skipped": unreadable count, "perceptual_metric": name}``. Decoder names in :data:`OWN_LATENTS` get their
        row in ``reconstruction``; others appear in the swap control only.
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
    return {
        "metrics": metrics,
        "reconstruction": {
            name: metrics[f"{name}_decoder/{OWN_LATENTS[name]}"] for name in decoder_states if name in OWN_LATENTS
        },
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
