"""Trained latent-image runs: load one from its folder and sample it. The one place the ``sample`` command,
evaluations and the default run load and sample runs.

Sampling is sharded deterministically (:mod:`manifold_fm.distributed`): chunk ``j`` of ``batch_size`` global sample
indices has its noise seeded by ``(seed, j, "sample")`` and is produced by process ``j % world_size``, so the samples
do not depend on how many processes share the work, and a chunk written to disk never needs sampling again
(:func:`sample_to_shards`). Sampling and decoding run in the sampler's ``precision`` (:mod:`manifold_fm.precision`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from manifold_fm.errors import InputError

from ..distributed import process_chunks
from ..eval.image_io import balanced_labels
from ..flow import Flow
from ..precision import precision_scope
from ..progress import progress_bar
from ..sampler import SamplerSpec, generate
from ..seeding import seeded_generator
from .builders import build_model, latent_flow
from .checkpoint import Checkpoint, load_checkpoint, select_checkpoint
from .image import class_names, load_tokenizer, run_decoder
from .run_folder import resolve_recorded_path
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

    @property
    def class_names(self) -> list[str]:
        """The names of the run's classes (for labelling pictures; :func:`~manifold_fm.training.image.class_names`)."""
        return class_names(self.cfg, self.num_classes)


def read_run_checkpoint(
    run: str | Path, *, checkpoint: str | int | Path | None = None, use_ema: bool | None = None
) -> Checkpoint:
    """The checkpoint of a trained image run: a run folder (its latest, or the kept one ``checkpoint`` names: a
    step or a ``step_*`` folder), its ``checkpoints`` folder, or one ``step_*`` folder. ``use_ema``: read only the
    weights sampling needs (``True``: the EMA file, or the raw weights if there is none; ``False``: the raw weights,
    never opening the EMA file) and not the training state; ``None``: every file."""
    run = Path(run)
    if not run.exists():
        raise FileNotFoundError(f"run {run} does not exist; pass the --out folder of manifold-fm train")
    ckpt_root = run / "checkpoints" if (run / "checkpoints").is_dir() else run
    chosen = select_checkpoint(ckpt_root, checkpoint) if checkpoint is not None else ckpt_root
    if use_ema is None:
        ckpt = load_checkpoint(chosen)
    else:
        folder = chosen if (chosen / "model.safetensors").is_file() else select_checkpoint(chosen) or chosen
        averaged = use_ema and (folder / "ema.safetensors").is_file()
        ckpt = load_checkpoint(folder, model=not averaged, ema=averaged, state=False)
    if "config" not in ckpt.meta or "latent_shape" not in ckpt.meta:
        raise InputError(f"checkpoint {ckpt.path} was not written by an image run (no config/latent_shape)")
    return ckpt


def checkpoint_run_folder(ckpt: Checkpoint) -> Path | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/step_*``), ``None`` for a loose one."""
    if ckpt.path is None or ckpt.path.parent.name != "checkpoints":
        return None
    return ckpt.path.parent.parent


def default_run_arms(folder: str | Path) -> list[Path] | None:
    """The modes' run folders of a default-run folder (``manifold-fm train`` with no config), in its config's
    order, whether or not they hold a checkpoint yet; ``None`` if ``folder`` is not a default run's."""
    import yaml

    folder = Path(folder)
    try:
        data = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(data, dict) or data.get("kind") != "default" or (folder / "checkpoints").is_dir():
        return None
    return [folder / str(m) for m in data.get("modes") or ["spherical", "linear"]]


def build_run(
    meta: Mapping[str, Any],
    weights: Mapping[str, Tensor],
    *,
    device: str | torch.device = "cpu",
    decode: bool = True,
    progress: bool = False,
    run_dir: str | Path | None = None,
) -> LoadedRun:
    """Rebuild a run from an image run's checkpoint record (``meta.json``: ``config``, ``latent_shape``,
    ``num_classes``, ``latent_normalization``, ``step``) and its network ``weights``: the one place a trained run
    is reassembled (:func:`load_run`, and :mod:`manifold_fm.pipeline` for exported models). ``run_dir``: the run
    folder, against which the record's relative file paths (``tokenizer.decoder_state``) are resolved."""
    cfg = load_image_config(meta["config"])
    if run_dir is not None and cfg.tokenizer.decoder_state is not None:
        decoder_state = resolve_recorded_path(cfg.tokenizer.decoder_state, run_dir)
        cfg = cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"decoder_state": decoder_state})})
    c, h, w = (int(v) for v in meta["latent_shape"])
    num_classes = int(meta["num_classes"])
    model = build_model(cfg.model, (c, h, w), num_classes)
    model.load_state_dict(weights)
    model.to(device).eval().requires_grad_(False)
    decoder = None
    if decode and cfg.tokenizer.kind != "none":
        # a run on a latent cache decodes with the cache's normalisation (e.g. extract-latents --dataset-stats),
        # recorded in the checkpoint; older checkpoints lack it and use the tokenizer's own constants
        decoder = run_decoder(cfg, load_tokenizer(cfg, progress=progress), meta.get("latent_normalization"))
        decoder.to(device)
    return LoadedRun(model, latent_flow(cfg.flow, c), decoder, cfg, (c, h, w), num_classes, int(meta["step"]))


def load_run(
    run: str | Path,
    *,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
    decode: bool = True,
    progress: bool = False,
    checkpoint: str | int | Path | None = None,
) -> LoadedRun:
    """Load a run folder (or its ``checkpoints`` folder, or one ``step_*`` folder) for sampling: its latest
    checkpoint or the kept one ``checkpoint`` names (a step or a ``step_*`` folder); the EMA weights (``use_ema``;
    the raw ones if the checkpoint has none) or the raw weights (``use_ema=False``: the EMA file is not read)."""
    ckpt = read_run_checkpoint(run, checkpoint=checkpoint, use_ema=use_ema)
    weights = ckpt.ema if (use_ema and ckpt.ema is not None) else ckpt.model
    return build_run(
        ckpt.meta, weights, device=device, decode=decode, progress=progress, run_dir=checkpoint_run_folder(ckpt)
    )


def _check_labels(run: LoadedRun, num_samples: int, labels: Tensor | None) -> Tensor:
    labels = balanced_labels(num_samples, run.num_classes) if labels is None else labels.long()
    if labels.shape != (num_samples,):
        raise InputError(f"expected {num_samples} labels, got shape {tuple(labels.shape)}")
    if int(labels.max()) >= run.num_classes or int(labels.min()) < 0:
        raise InputError(f"labels must be in [0, {run.num_classes}), got {int(labels.min())}..{int(labels.max())}")
    return labels


@torch.no_grad()
def sample_chunks(
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
    skip: Callable[[int], bool] = lambda chunk: False,
) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    """This process's chunks of ``num_samples``, one at a time: ``(chunk, indices, labels, images or latents)``.
    Chunks for which ``skip(chunk)`` is true (e.g. already on disk) are not sampled (see the module docstring for
    the sharding)."""
    labels = _check_labels(run, num_samples, labels)
    device = next(run.model.parameters()).device
    chunks = [c for c in process_chunks(num_samples, batch_size, rank, world_size) if not skip(c[0])]
    for j, start, stop in progress_bar(chunks, desc="sample", disable=not progress, unit="batch"):
        idx = torch.arange(start, stop)
        y = labels[idx].to(device)
        g = seeded_generator(seed, j, "sample", device=device)
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
            with precision_scope(spec.precision, device):
                z = run.decoder.decode(z.to(run.decoder.device, run.decoder.dtype)).float()
        yield j, idx, y.cpu(), z.float().cpu()


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
    """This process's share of ``num_samples`` in memory: ``(indices, labels, images or latents)``."""
    parts = list(
        sample_chunks(
            run,
            num_samples,
            spec,
            seed=seed,
            batch_size=batch_size,
            labels=labels,
            rank=rank,
            world_size=world_size,
            progress=progress,
            decode=decode,
        )
    )
    if not parts:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return tuple(torch.cat([p[i] for p in parts]) for i in (1, 2, 3))  # type: ignore[return-value]


def sample_to_shards(
    run: LoadedRun,
    num_samples: int,
    spec: SamplerSpec,
    shards: Path,
    request: Mapping[str, Any],
    *,
    seed: int = 0,
    batch_size: int = 64,
    labels: Tensor | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> tuple[int, int]:
    """Write this process's chunks to ``shards/chunk_XXXXXX.npz`` (the ADM layout with ``(index, label)`` rows),
    each atomically, skipping chunks already there: a stopped ``sample`` resumes where it stopped. ``request`` (the
    run, step, sampler, seed, ...) is kept in ``shards/request.json``; shards written for another request are
    refused in one line rather than mixed in. Call from every process; the caller merges
    (:func:`~manifold_fm.eval.image_io.merge_shards`) once all have finished. Returns this process's
    ``(chunks kept from disk, chunks sampled now)``."""
    import json

    import numpy as np

    from ..atomic import write_json_atomic
    from ..eval.image_io import save_npz, to_uint8

    record = shards / "request.json"
    wanted = json.loads(json.dumps(dict(request), default=str))
    if record.is_file() and json.loads(record.read_text()) != wanted:
        raise InputError(
            f"{shards} holds samples of another request (see its request.json); delete it or choose another --out"
        )
    if rank == 0 and not record.is_file():
        write_json_atomic(record, wanted)

    kept: set[int] = set()

    def done(chunk: int) -> bool:
        if (shards / f"chunk_{chunk:06d}.npz").is_file():
            kept.add(chunk)
            return True
        return False

    sampled = 0
    for j, idx, y, images in sample_chunks(
        run,
        num_samples,
        spec,
        seed=seed,
        batch_size=batch_size,
        labels=labels,
        rank=rank,
        world_size=world_size,
        progress=progress,
        skip=done,
    ):
        rows = np.stack([idx.numpy(), y.numpy()], axis=1)
        save_npz(shards / f"chunk_{j:06d}.npz", to_uint8(images), rows)
        sampled += 1
    return len(kept), sampled


__all__ = [
    "LoadedRun",
    "build_run",
    "checkpoint_run_folder",
    "default_run_arms",
    "load_run",
    "read_run_checkpoint",
    "sample_chunks",
    "sample_run",
    "sample_to_shards",
]
