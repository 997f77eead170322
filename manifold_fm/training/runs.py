"""Trained latent-image runs: load one from its folder and sample it. The one place the ``sample`` command,
evaluations and the default run load and sample runs.

Sampling is sharded deterministically: chunk ``j`` of ``batch_size`` global sample indices has its noise seeded by
``(seed, j, "sample")`` and is produced by process ``j % world_size``, so the samples do not depend on how many
processes share the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..eval.image_io import balanced_labels
from ..flow import Flow
from ..sampler import SamplerSpec, generate
from ..seeding import derive_seed
from .builders import build_model, latent_flow
from .checkpoint import load_checkpoint
from .image import load_tokenizer, run_decoder
from .schema import ImageRunConfig, load_image_config


@dataclass
class LoadedRun:
    """A trained run ready to sample: EMA (or raw) weights, its flow, decoder, config and shapes."""

    model: nn.Module
    flow: Flow
    decoder: Any
    cfg: ImageRunConfig
    latent_shape: tuple[int, int, int]
    num_classes: int
    step: int


def load_run(
    run: str | Path,
    *,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
    decode: bool = True,
    progress: bool = False,
) -> LoadedRun:
    """Load a run folder (or its ``checkpoints`` folder, or one ``step_*`` folder) for sampling."""
    run = Path(run)
    if not run.exists():
        raise FileNotFoundError(f"run {run} does not exist; pass the --out folder of manifold-fm train")
    ckpt_root = run / "checkpoints" if (run / "checkpoints").is_dir() else run
    ckpt = load_checkpoint(ckpt_root)
    meta = ckpt.meta
    if "config" not in meta or "latent_shape" not in meta:
        raise ValueError(f"checkpoint {ckpt.path} was not written by an image run (no config/latent_shape)")
    cfg = load_image_config(meta["config"])
    c, h, w = (int(v) for v in meta["latent_shape"])
    num_classes = int(meta["num_classes"])
    model = build_model(cfg.model, (c, h, w), num_classes)
    weights = ckpt.ema if (use_ema and ckpt.ema is not None) else ckpt.model
    model.load_state_dict(weights)
    model.to(device).eval().requires_grad_(False)
    decoder = None
    if decode and cfg.tokenizer.kind != "none":
        # a run on a latent cache decodes with the cache's normalisation (e.g. extract-latents --dataset-stats),
        # recorded in the checkpoint; older checkpoints lack it and use the tokenizer's own constants
        decoder = run_decoder(cfg, load_tokenizer(cfg, progress=progress), meta.get("latent_normalization"))
        decoder.to(device)
    return LoadedRun(model, latent_flow(cfg.flow, c), decoder, cfg, (c, h, w), num_classes, ckpt.step)


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
    """This process's share of ``num_samples``: ``(indices, labels, images or latents)`` (see the module
    docstring for the sharding)."""
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
        g = torch.Generator(device=device).manual_seed(derive_seed(seed, j, "sample"))
        z = generate(
            run.model,
            run.flow,
            (y.shape[0], *run.latent_shape),
            spec,
            generator=g,
            labels=y,
            null_class=run.num_classes,
        )
        if decode and run.decoder is not None:
            z = run.decoder.decode(z.to(run.decoder.device, run.decoder.dtype)).float()
        idx_out.append(idx)
        lab_out.append(y.cpu())
        out.append(z.float().cpu())
    if not out:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(idx_out), torch.cat(lab_out), torch.cat(out)


__all__ = ["LoadedRun", "load_run", "sample_run"]
