"""Decoder finetuning for spherical tokenizers: encoder frozen, decoder trained to decode projected latents.

Per step, with ``x`` a batch of images, ``z = E(x)`` the frozen posterior mode and ``z~ = sqrt(d) z/|z|`` per
token (``project=True``; ``z~ = z`` gives the paper's "FT-vanilla" control, same recipe on raw latents)::

    L_rec = w_l1 * mean|D(z~) - x| + w_p * P(D(z~), x)
    L_G = L_rec + ramp(step) * w_gan * a * (-mean Disc(D(z~)))
    L_D = mean relu(1 - Disc(x)) + mean relu(1 + Disc(D(z~)))            (hinge; only once step >= gan_start)

``P`` is LPIPS when local weights are given, else the named fallback distance; ``ramp`` goes linearly from 0 to 1
over ``gan_warmup`` steps starting at ``gan_start`` (the discriminator warm-up); ``a`` is the adaptive weight of
taming-transformers / LDM, ``|grad_W L_rec| / (|grad_W L_adv| + 1e-4)`` at the decoder's last convolution ``W``
(clamped to ``[0, 1e4]``), or 1 with ``adaptive_gan_weight=False``. The KL term is dropped (the
encoder is frozen). The report compares PSNR / SSIM / perceptual distance on held-out images for: the original
decoder on raw latents, the original decoder on projected latents, and the finetuned decoder on the latents it was
trained for.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..data.guarded import GuardedItems, collate_guarded, load_image_batch
from ..manifolds import TokenSpheres
from .base import Tokenizer
from .perceptual import GradientPyramidDistance, psnr, ssim


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator: stride-2 4x4 convolutions, GroupNorm, LeakyReLU; one logit per image patch."""

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


def finetune_decoder(
    tokenizer: Tokenizer,
    dataset: Dataset,
    steps: int,
    *,
    batch_size: int = 16,
    lr: float = 1e-4,
    project: bool = True,
    perceptual: nn.Module | None = None,
    l1_weight: float = 1.0,
    perceptual_weight: float = 1.0,
    gan_weight: float = 0.1,
    gan_start: int | None = None,
    gan_warmup: int | None = None,
    disc_lr: float | None = None,
    adaptive_gan_weight: bool = True,
    num_workers: int = 0,
    eval_dataset: Dataset | None = None,
    eval_items: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Finetune a copy of ``tokenizer``'s decoder (see the module docstring); returns ``(decoder_state, report)``.

    Args:
        tokenizer: any :class:`Tokenizer`; its encoder and decoder stay untouched.
        dataset: yields ``(image, label)``; batches are drawn with replacement from a generator seeded by ``seed``.
        steps: optimisation steps.
        project: train on projected latents (spherical tokenizer) or raw ones (the FT-vanilla control).
        perceptual: an image distance module; default :class:`GradientPyramidDistance` (the weightless fallback).
        gan_start / gan_warmup: discriminator start step (default ``steps // 2``) and ramp length
            (default ``max(1, steps // 10)``).
        eval_dataset: held-out images for the report (default: the first ``eval_items`` items of ``dataset``).
        num_workers: DataLoader processes reading training images (image folders on a GPU machine); 0 reads them
            in this process (the built-in dataset renders whole batches at once).

    Returns:
        the finetuned decoder's float32 CPU state dict, and a JSON-safe report with the settings, final losses and
        a ``"metrics"`` mapping ``"<decoder>/<latents>" -> {psnr, ssim, perceptual}``.
    """
    if steps < 0:
        raise ValueError(f"finetune steps must be >= 0, got {steps}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("finetune dataset is empty")
    device = tokenizer.device
    tokenizer.eval().requires_grad_(False)
    manifold = TokenSpheres(tokenizer.latent_channels, axis=1)
    perceptual = (perceptual or GradientPyramidDistance()).to(device)
    perceptual.requires_grad_(False)
    gan_start = steps // 2 if gan_start is None else gan_start
    gan_warmup = max(1, steps // 10) if gan_warmup is None else max(1, gan_warmup)

    def latents_of(x: Tensor, proj: bool) -> Tensor:
        with torch.no_grad():
            z = tokenizer.encode_raw(x.to(device, tokenizer.dtype)).float()
        return manifold.projx(z) if proj else z

    decoder = copy.deepcopy(tokenizer.decoder_module()).float().to(device).train().requires_grad_(True)
    convs = [q for q in decoder.parameters() if q.ndim == 4]
    if not convs and adaptive_gan_weight and gan_weight > 0:
        raise ValueError("adaptive GAN weighting needs a convolutional decoder; pass adaptive_gan_weight=False")
    last_conv = convs[-1] if convs else None
    with torch.random.fork_rng(devices=[]):  # a seeded discriminator init without touching the global RNG
        torch.manual_seed(seed)
        disc = PatchDiscriminator().to(device)
    opt_g = torch.optim.AdamW(decoder.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=disc_lr or lr, betas=(0.5, 0.9), weight_decay=0.0)

    g = torch.Generator().manual_seed(seed)
    n = len(dataset)  # type: ignore[arg-type]
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
        z = latents_of(x, project)
        rec = decoder(z)
        l1 = (rec - x).abs().mean()
        p = perceptual(rec, x).mean()
        loss = l1_weight * l1 + perceptual_weight * p
        ramp = 0.0 if step < gan_start else min(1.0, (step - gan_start + 1) / gan_warmup)
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
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt_g.step()
        d_loss = torch.zeros((), device=device)
        if step >= gan_start and gan_weight > 0:
            disc.requires_grad_(True)
            d_loss = torch.relu(1 - disc(x)).mean() + torch.relu(1 + disc(rec.detach())).mean()
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

    # Held-out reconstruction report.
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
    report: dict[str, Any] = {
        "tokenizer": tokenizer.name,
        "project": project,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weights": {
            "l1": l1_weight,
            "perceptual": perceptual_weight,
            "gan": gan_weight,
            "adaptive_gan_weight": adaptive_gan_weight,
        },
        "gan_start": gan_start,
        "gan_warmup": gan_warmup,
        "perceptual_metric": getattr(perceptual, "name", type(perceptual).__name__),
        "eval_items": m,
        "final_losses": last,
        "metrics": metrics,
        "rfid": None,
        "rfid_note": "rFID needs local Inception weights (torch-fidelity); not computed by finetune_decoder",
    }
    state = {k: v.detach().float().cpu().contiguous() for k, v in decoder.state_dict().items()}
    return state, report
