"""The built-in tokenizer: a small convolutional VAE (f = 4, d = 16, ~0.4M parameters) for the built-in images.

``TinyVAE`` maps ``(B, 3, 32, 32)`` images to ``(B, 16, 8, 8)`` latents (64 tokens of dimension 16). It trains on
:class:`~manifold_fm.data.builtin_images.BuiltinImages` on a CPU in a few minutes (:func:`train_tiny_vae`) with
``L1 + MSE + beta * KL`` (a diagonal-Gaussian posterior, so it is a VAE like the SD/FLUX tokenizers whose geometry we
study). Its latent normalisation is the per-channel mean/std of the posterior mode over the training set.

Weights ship in ``manifold_fm/assets/tiny_vae.safetensors``; regenerate them (deterministically) with::

    python -m manifold_fm.tokenizers.tiny_vae --out manifold_fm/assets/tiny_vae.safetensors  # 800 steps, 1 thread

(4.6 to 7 minutes measured on a 2-core CPU shared with other jobs; test-set PSNR 28.1 dB. A rerun reproduced
the shipped tensors bit for bit with 1 thread.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from manifold_fm.errors import InputError

from ..atomic import atomic_path
from ..data.normalization import LatentNormalization
from .base import Tokenizer, compute_channel_stats

ASSET_PATH = Path(__file__).resolve().parent.parent / "assets" / "tiny_vae.safetensors"
CACHE_NAME = "tiny_vae-v1.safetensors"


def _groups(c: int) -> int:
    return 8 if c % 8 == 0 else 1


class ResBlock(nn.Module):
    """``x + conv(silu(norm(conv(silu(norm(x))))))`` with GroupNorm; channel count unchanged."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(_groups(c), c), nn.Conv2d(c, c, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(_groups(c), c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(F.silu(self.n1(x)))
        return x + self.c2(F.silu(self.n2(h)))


class TinyEncoder(nn.Module):
    """Images ``(B, 3, H, W)`` -> posterior moments ``(B, 2d, H/f, W/f)`` (mean then log-variance).

    A stride-2 4x4 stem (no full-resolution blocks: on a CPU they would cost most of the compute), one residual
    block per stage, stride-2 convolutions between stages and an extra block at the latent resolution.
    """

    def __init__(self, latent_channels: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 4, stride=2, padding=1), ResBlock(channels[0])]
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=False):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), ResBlock(c_out)]
        c = channels[-1]
        layers += [ResBlock(c), nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, 2 * latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TinyDecoder(nn.Module):
    """Latents ``(B, d, h, w)`` -> images ``(B, 3, f h, f w)`` (unclamped; ~[-1, 1] after training).

    Mirrors the encoder; the last 2x upsampling is a pixel shuffle of a ``3 * 4``-channel convolution.
    """

    def __init__(self, latent_channels: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        rev = tuple(reversed(channels))
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, rev[0], 3, padding=1), ResBlock(rev[0]), ResBlock(rev[0])]
        for c_in, c_out in zip(rev[:-1], rev[1:], strict=False):
            up = nn.Upsample(scale_factor=2, mode="nearest")
            layers += [up, nn.Conv2d(c_in, c_out, 3, padding=1), ResBlock(c_out)]
        c = rev[-1]
        layers += [nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, 3 * 4, 3, padding=1), nn.PixelShuffle(2)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class TinyVAE(nn.Module):
    """A small convolutional VAE; a stride-2 stem plus ``len(channels) - 1`` stride-2 stages give
    ``downsample = 2**len(channels)`` (4 for the default ``(32, 64)``)."""

    def __init__(self, latent_channels: int = 16, channels: tuple[int, ...] = (32, 64)) -> None:
        super().__init__()
        if latent_channels < 2:
            raise InputError(f"TinyVAE latent_channels must be >= 2, got {latent_channels}")
        self.config = {"latent_channels": int(latent_channels), "channels": [int(c) for c in channels]}
        self.latent_channels = int(latent_channels)
        self.downsample = 2 ** len(channels)
        self.encoder = TinyEncoder(latent_channels, tuple(channels))
        self.decoder = TinyDecoder(latent_channels, tuple(channels))

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance (clamped to [-30, 20] as in diffusers)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        mean, logvar = self.moments(x)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            z = mean + torch.exp(0.5 * logvar) * eps
        kl = 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar)
        return {"recon": self.decoder(z), "mean": mean, "kl": kl.mean()}


class TinyVAETokenizer(Tokenizer):
    """The :class:`Tokenizer` view of a :class:`TinyVAE` (posterior mode, normalised per channel)."""

    def __init__(self, vae: TinyVAE, normalization: LatentNormalization | None = None, name: str = "tiny-vae") -> None:
        self.vae = vae
        self.latent_channels = vae.latent_channels
        self.downsample = vae.downsample
        self.normalization = normalization or LatentNormalization()
        self.name = name

    def encode_raw(self, images: Tensor) -> Tensor:
        return self.vae.moments(images)[0]

    def decode_raw(self, latents: Tensor) -> Tensor:
        return self.vae.decoder(latents).clamp(-1.0, 1.0)

    def decoder_module(self) -> nn.Module:
        return self.vae.decoder

    def modules(self) -> Iterable[nn.Module]:
        return (self.vae,)


# ---------------------------------------------------------------- save / load
def save_tiny_vae(vae: TinyVAE, normalization: LatentNormalization, path: str | Path, info: dict[str, Any]) -> None:
    """Write weights (float32) + normalisation + config to one safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"vae.{k}": v.detach().float().contiguous().cpu() for k, v in vae.state_dict().items()}
    tensors["norm.shift"] = normalization.shift.float().contiguous()
    tensors["norm.scale"] = normalization.scale.float().contiguous()
    meta = {"config": json.dumps(vae.config), "info": json.dumps(info), "format": "manifold-fm-tiny-vae-v1"}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_tiny_vae(path: str | Path) -> TinyVAETokenizer:
    """Load a file written by :func:`save_tiny_vae` as an eval-mode, frozen :class:`TinyVAETokenizer`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tiny VAE weights {path} do not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"tiny VAE weights {path} are unreadable ({exc}); delete the file to retrain") from None
    if meta.get("format") != "manifold-fm-tiny-vae-v1":
        raise InputError(f"{path} is not a manifold-fm tiny VAE file (format {meta.get('format')!r})")
    config = json.loads(meta["config"])
    vae = TinyVAE(config["latent_channels"], tuple(config["channels"]))
    vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
    vae.eval().requires_grad_(False)
    norm = LatentNormalization(shift=tensors["norm.shift"], scale=tensors["norm.scale"], kind="dataset")
    return TinyVAETokenizer(vae, norm, name=tiny_vae_name(path))


def tiny_vae_name(path: str | Path) -> str:
    """The ``name`` of the tokenizer :func:`load_tiny_vae` loads from ``path``: ``builtin-tiny-vae-<digest>``, the
    first 10 hex digits of the file's SHA-256 (known without building the model)."""
    return f"builtin-tiny-vae-{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:10]}"


# ------------------------------------------------------------------ training
def train_tiny_vae(
    *,
    steps: int = 800,
    batch_size: int = 32,
    lr: float = 2e-3,
    kl_weight: float = 1e-3,
    latent_channels: int = 16,
    channels: tuple[int, ...] = (32, 64),
    per_class: int = 500,
    eval_per_class: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> tuple[TinyVAE, LatentNormalization, dict[str, Any]]:
    """Train a :class:`TinyVAE` on the built-in training images; deterministic for a given seed and thread count.

    Loss per batch: ``mean|x - x_hat| + mean (x - x_hat)^2 + kl_weight * mean KL`` with a sampled posterior and
    random horizontal flips; AdamW with linear warm-up then cosine decay. Returns the model (eval mode), the
    per-channel normalisation of its posterior mode over the training set, and a report (final losses, test PSNR).
    """
    from ..data.builtin_images import BuiltinImages
    from ..progress import progress_bar

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train = BuiltinImages("train", per_class=per_class, seed=0)
    images, _ = train.tensors()
    vae = TinyVAE(latent_channels, channels)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    vae.train()
    bar = progress_bar(range(steps), disable=not progress, desc="train tiny VAE")
    last: dict[str, float] = {}
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x = images[idx]
        flip = torch.rand(batch_size, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        out = vae(x, generator=g)
        l1 = (out["recon"] - x).abs().mean()
        l2 = ((out["recon"] - x) ** 2).mean()
        loss = l1 + l2 + kl_weight * out["kl"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        last = {"l1": l1.item(), "mse": l2.item(), "kl": out["kl"].item()}
        if step % 50 == 0:
            bar.set_postfix(l1=f"{last['l1']:.4f}", kl=f"{last['kl']:.2f}")
    vae.eval().requires_grad_(False)
    tok = TinyVAETokenizer(vae)
    norm = compute_channel_stats(tok, torch.utils.data.TensorDataset(images), batch_size=256)
    with torch.no_grad():
        test_x, _ = BuiltinImages("test", per_class=eval_per_class, seed=0).tensors()
        rec = tok.decode_raw(tok.encode_raw(test_x))
        mse = ((rec - test_x) / 2).pow(2).flatten(1).mean(1)
        psnr = float((10 * torch.log10(1.0 / mse.clamp_min(1e-12))).mean())
    report = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "kl_weight": kl_weight,
        "seed": seed,
        "final": last,
        "test_psnr": psnr,
        "params": sum(p.numel() for p in vae.parameters()),
    }
    return vae, norm, report


def default_cache_dir() -> Path:
    """``$MANIFOLD_FM_CACHE`` or ``~/.cache/manifold-fm``."""
    env = os.environ.get("MANIFOLD_FM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "manifold-fm"


def builtin_tokenizer_file(cache_dir: str | Path | None = None) -> Path | None:
    """The weight file :func:`builtin_tokenizer` loads: the shipped one, else the cached copy; ``None`` if neither
    exists yet (it would train one)."""
    if ASSET_PATH.is_file():
        return ASSET_PATH
    path = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / CACHE_NAME
    return path if path.is_file() else None


def builtin_tokenizer(
    cache_dir: str | Path | None = None, *, train_if_missing: bool = True, progress: bool = True
) -> TinyVAETokenizer:
    """The built-in tiny VAE tokenizer, frozen and in eval mode.

    Loads the weights shipped in ``manifold_fm/assets/`` when present; otherwise the cached copy in ``cache_dir``
    (default :func:`default_cache_dir`), training and caching it first if ``train_if_missing``.
    """
    if ASSET_PATH.is_file():
        return load_tiny_vae(ASSET_PATH)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache / CACHE_NAME
    if path.is_file():
        return load_tiny_vae(path)
    if not train_if_missing:
        raise FileNotFoundError(
            f"no built-in tokenizer weights at {ASSET_PATH} or {path}; call builtin_tokenizer(train_if_missing=True)"
        )
    vae, norm, report = train_tiny_vae(progress=progress)
    save_tiny_vae(vae, norm, path, report)
    return load_tiny_vae(path)


def main(argv: list[str] | None = None) -> None:
    """Regenerate the shipped weights: ``python -m manifold_fm.tokenizers.tiny_vae --out PATH``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, default=ASSET_PATH)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae, norm, report = train_tiny_vae(steps=args.steps, seed=args.seed)
    save_tiny_vae(vae, norm, args.out, report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
