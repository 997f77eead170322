"""Class-conditional sampling from trained runs: latents via the engine's solvers, images, PNG grids, ADM ``.npz``.

Sampling solves ``dx/dt = P_x v(x, t, y)`` from the prior at ``t = 0`` to data at ``t = 1`` with any
:func:`manifold_fm.solvers.integrate` method (exp-map steppers on the token spheres; plain steps in the linear
baseline), optionally with classifier-free guidance ``v = v_u + s (v_c - v_u)`` inside a ``t`` interval.

Noise is seeded per chunk of ``batch_size`` global sample indices (``seed``, chunk), and chunks are dealt to
processes round-robin, so the images do not depend on how many processes share the work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..atomic import atomic_path


@dataclass
class SamplerSpec:
    """Solver and guidance settings: ``method`` is any :func:`~manifold_fm.solvers.integrate` method."""

    method: str = "euler"
    steps: int = 50
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] | None = None


def _chunk_seed(seed: int, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed},{chunk},sample".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_velocity(
    model: nn.Module, labels: Tensor, spec: SamplerSpec, null_class: int
) -> Callable[[Tensor, Tensor], Tensor]:
    """``v(x, t)`` for the solver: conditional, or guided through the engine's ``guided_velocity``."""
    if spec.cfg_scale == 1.0:
        return lambda x, t: model(x, t, labels)
    from ..guidance import guided_velocity

    return guided_velocity(model, labels, spec.cfg_scale, null_class, interval=spec.cfg_interval)


@torch.no_grad()
def generate_latents(
    model: nn.Module,
    flow: Any,
    labels: Tensor,
    shape: Sequence[int],
    spec: SamplerSpec,
    *,
    seed: int = 0,
    null_class: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Latents ``(len(labels), *shape)`` sampled from ``model`` with ``flow``'s prior and manifold."""
    from ..solvers import integrate

    device = labels.device
    was_training = model.training
    model.eval()
    g = generator if generator is not None else torch.Generator(device=device).manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x0 = flow.prior((labels.shape[0], *shape), g, device, dtype=torch.float32).to(dtype)
    velocity = make_velocity(model, labels, spec, null_class)
    x1 = integrate(velocity, x0, flow.manifold, steps=spec.steps, method=spec.method)
    model.train(was_training)
    return x1


def to_uint8(images: Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` in [-1, 1] -> ``(N, H, W, 3)`` uint8, rounding as ADM does (``(x + 1) * 127.5``)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_image_grid(images: Tensor, path: str | Path, nrow: int = 8, padding: int = 2) -> Path:
    """A PNG grid of ``(N, 3, H, W)`` images in [-1, 1], ``nrow`` images per row, written atomically."""
    from PIL import Image
    from torchvision.utils import make_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images.float().clamp(-1, 1).cpu(), nrow=nrow, padding=padding, pad_value=1.0)
    arr = to_uint8(grid[None])[0]
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path


def save_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """The ADM evaluator's layout: ``arr_0`` uint8 ``(N, H, W, 3)`` (and ``arr_1`` labels), written atomically."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"ADM .npz needs uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = [images] if labels is None else [images, labels.astype(np.int64)]
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, *arrays)
    return path


def merge_shards(shards: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Merge ``part_*.npz`` shards (``arr_0`` images, ``arr_1`` rows of ``(global index, label)``) in index order."""
    files = sorted(Path(shards).glob("part_*.npz"))
    if not files:
        raise FileNotFoundError(f"no part_*.npz shards in {shards}")
    images, meta = [], []
    for f in files:
        with np.load(f) as d:
            if d["arr_0"].shape[0]:
                images.append(d["arr_0"])
            meta.append(d["arr_1"].reshape(-1, 2))
    index = np.concatenate(meta)
    if len(np.unique(index[:, 0])) != len(index):
        raise ValueError(f"shards in {shards} overlap (a sample index appears twice); delete them and resample")
    order = np.argsort(index[:, 0], kind="stable")
    return np.concatenate(images)[order], index[order, 1]


# ----------------------------------------------------------------------------- runs
@dataclass
class LoadedRun:
    """A trained run ready to sample: EMA (or raw) weights, its flow, decoder and shapes."""

    model: nn.Module
    flow: Any
    decoder: Any
    cfg: Any
    latent_shape: tuple[int, int, int]
    num_classes: int
    step: int


def load_run(run: str | Path, *, use_ema: bool = True, device: str | torch.device = "cpu",
             decode: bool = True, progress: bool = False) -> LoadedRun:
    """Load a run folder (or its ``checkpoints`` folder, or one ``step_*`` folder) for sampling."""
    from ..training.checkpoint import load_checkpoint
    from ..training.image import build_model, load_tokenizer, run_decoder
    from ..training.image_config import load_image_config
    from ..training.trainer import flow_from_config

    run = Path(run)
    if not run.exists():
        raise FileNotFoundError(f"run {run} does not exist; pass the --out folder of manifold-fm train")
    ckpt_root = run / "checkpoints" if (run / "checkpoints").is_dir() else run
    ckpt = load_checkpoint(ckpt_root)
    meta = ckpt.meta
    if "config" not in meta or "latent_shape" not in meta:
        raise ValueError(f"checkpoint {ckpt.path} was not written by the image trainer (no config/latent_shape)")
    cfg = load_image_config(meta["config"])
    c, h, w = (int(v) for v in meta["latent_shape"])
    num_classes = int(meta["num_classes"])
    model = build_model(cfg, c, h, num_classes)
    weights = ckpt.ema if (use_ema and ckpt.ema is not None) else ckpt.model
    model.load_state_dict(weights)
    model.to(device).eval().requires_grad_(False)
    flow = flow_from_config(cfg, c)
    decoder = None
    if decode and cfg.tokenizer.kind != "none":
        # a run on a latent cache decodes with the cache's normalisation (e.g. extract-latents --dataset-stats),
        # recorded in the checkpoint; older checkpoints lack it and use the tokenizer's own constants
        decoder = run_decoder(cfg, load_tokenizer(cfg, progress=progress), meta.get("latent_normalization"))
        decoder.to(device)
    return LoadedRun(model, flow, decoder, cfg, (c, h, w), num_classes, ckpt.step)


def balanced_labels(n: int, num_classes: int) -> Tensor:
    """``i % num_classes``: every class equally often (up to one)."""
    return torch.arange(n) % num_classes


@torch.no_grad()
def sample_run(
    run: LoadedRun,
    num_samples: int,
    spec: SamplerSpec,
    *,
    seed: int = 0,
    batch_size: int = 64,
    labels: Tensor | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    decode: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """This process's share of ``num_samples``: ``(indices, labels, images or latents)``.

    Chunk ``j`` covers global indices ``[j * batch_size, (j + 1) * batch_size)``, its noise is seeded by
    ``(seed, j)`` and it is produced by process ``j % world_size``.
    """
    labels = balanced_labels(num_samples, run.num_classes) if labels is None else labels.long()
    if labels.shape != (num_samples,):
        raise ValueError(f"expected {num_samples} labels, got shape {tuple(labels.shape)}")
    if int(labels.max()) >= run.num_classes or int(labels.min()) < 0:
        raise ValueError(f"labels must be in [0, {run.num_classes}), got {int(labels.min())}..{int(labels.max())}")
    device = next(run.model.parameters()).device
    chunks = list(range(rank, -(-num_samples // batch_size), world_size))
    idx_out, lab_out, out = [], [], []
    for j in tqdm(chunks, desc="sample", disable=not progress, unit="batch"):
        idx = torch.arange(j * batch_size, min((j + 1) * batch_size, num_samples))
        y = labels[idx].to(device)
        g = torch.Generator(device=device).manual_seed(_chunk_seed(seed, j))
        z = generate_latents(run.model, run.flow, y, run.latent_shape, spec, null_class=run.num_classes, generator=g)
        if decode and run.decoder is not None:
            z = run.decoder.decode(z.to(run.decoder.device, run.decoder.dtype)).float()
        idx_out.append(idx)
        lab_out.append(y.cpu())
        out.append(z.float().cpu())
    if not out:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(idx_out), torch.cat(lab_out), torch.cat(out)


def on_sphere_error(latents: Tensor) -> float:
    """Largest relative deviation of a token norm from ``sqrt(C)`` (``| |z| / sqrt(C) - 1 |``, channel axis 1)."""
    c = latents.shape[1]
    norms = torch.linalg.vector_norm(latents.double(), dim=1)
    return float((norms / c**0.5 - 1).abs().max())
