"""The flow-matching training loop on latents, on accelerate (CPU, one GPU, several GPUs, several machines).

One step, for a batch of data latents ``x1`` (``(B, C, h, w)``) and labels ``y``:

1. labels are replaced by the null class with probability ``class_dropout`` (for classifier-free guidance);
2. ``t ~ p(t)`` (uniform / logit-normal, optionally shifted), ``x0 ~`` the manifold's prior (``random_base``);
3. ``(x_t, u_t) = path.sample(x0, x1, t)``; loss ``mean |P_{x_t} v(x_t, t, y) - P_{x_t} u_t|^2``;
4. AdamW step with gradient clipping, then an EMA update.

Spherical mode uses ``TokenSpheres(C, axis=1)``, data projected to radius ``sqrt(C)`` per token, the geodesic
(slerp) path and the tangent-projected loss; linear mode uses ``Euclidean``, a Gaussian prior and the straight path.
Spherical data must be the tokenizer's *raw* latents (or already projected ones): ``projx`` of those is
``SphericalTokenizer.encode``, what a finetuned decoder expects; :func:`manifold_fm.training.image.build_latents`
reads caches denormalised for that reason.

Exact resume: every random draw of step ``k`` on process ``r`` comes from a generator seeded by ``(seed, k, r)``
and the data order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so the stream of batches and noise is a
pure function of the step. A checkpoint stores weights, EMA, optimizer, LR schedule and the global RNG states, so a
run interrupted at step ``k`` and resumed reaches bitwise the same weights at step ``n`` on CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config import to_dict
from ..manifolds import Euclidean, Manifold, TokenSpheres
from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .ema import EMA
from .image_config import ImageRunConfig
from .logging import RunLogger

# The config sections a resumed run must share with its checkpoint (train.steps may grow, logging may change).
RESUME_KEYS = ("model", "flow", "data", "optim")


class TrainingError(ValueError):
    """The training run cannot continue (diverged loss, resume mismatch); the message says what to do."""


# ----------------------------------------------------------------------------- flow
@dataclass
class FlowSetup:
    """Path, prior and loss geometry of one flow-matching mode; ``project_data`` puts data tokens on the spheres."""

    mode: str
    manifold: Manifold
    path: Any
    time_sampler: Any
    project_data: bool

    def prepare_data(self, x1: Tensor) -> Tensor:
        return self.manifold.projx(x1) if self.project_data else x1

    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
              dtype: torch.dtype = torch.float32) -> Tensor:
        return self.manifold.random_base(shape, generator=generator, dtype=dtype, device=device)


def make_flow(mode: str, latent_channels: int, time: str = "uniform", time_mean: float = 0.0,
              time_std: float = 1.0, time_shift: float = 1.0) -> FlowSetup:
    """``"spherical"``: TokenSpheres prior/data + geodesic path; ``"linear"``: Gaussian prior + straight path."""
    from ..paths import GeodesicPath, LinearPath
    from ..time import build_time_sampler

    sampler = build_time_sampler(time, mean=time_mean, std=time_std, shift=time_shift)
    if mode == "spherical":
        manifold = TokenSpheres(latent_channels, axis=1)
        return FlowSetup(mode, manifold, GeodesicPath(manifold), sampler, project_data=True)
    if mode == "linear":
        path = LinearPath()
        return FlowSetup(mode, Euclidean(), path, sampler, project_data=False)
    raise ValueError(f"unknown flow mode '{mode}'; choose spherical or linear")


def flow_from_config(cfg: ImageRunConfig, latent_channels: int) -> FlowSetup:
    f = cfg.flow
    return make_flow(f.mode, latent_channels, f.time, f.time_mean, f.time_std, f.time_shift)


# ----------------------------------------------------------------------------- data order
def _seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class StepIndexer:
    """Which dataset indices step ``k`` uses on process ``rank``.

    Epoch ``e`` visits ``randperm(n)`` seeded by ``(seed, e)``; it holds ``n // global_batch`` full batches (the
    remainder is dropped), and process ``r`` takes the ``r``-th slice of each global batch.
    """

    def __init__(self, n: int, global_batch: int, seed: int, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} is not divisible by the {world_size} processes")
        if n < global_batch:
            raise ValueError(f"the dataset has {n} items, fewer than one batch of {global_batch}; lower the batch size")
        self.n, self.global_batch, self.seed, self.world_size = n, global_batch, seed, world_size
        self.local_batch = global_batch // world_size
        self.batches_per_epoch = n // global_batch
        self._epoch: int | None = None
        self._perm: Tensor | None = None

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch index within the epoch)`` of step ``step`` (0-based)."""
        return divmod(step, self.batches_per_epoch)

    def permutation(self, epoch: int) -> Tensor:
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(_seed(self.seed, epoch, 0xDA7A))
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        assert self._perm is not None
        return self._perm

    def indices(self, step: int, rank: int = 0) -> Tensor:
        epoch, b = self.position(step)
        start = b * self.global_batch + rank * self.local_batch
        return self.permutation(epoch)[start : start + self.local_batch]


# ----------------------------------------------------------------------------- latent sources
class LatentSource(Protocol):
    """Training latents: ``len()`` items and a way to iterate the batches of steps ``[start, end)``."""

    def __len__(self) -> int: ...

    def batches(self, indexer: StepIndexer, start: int, end: int, rank: int) -> Iterator[tuple[Tensor, Tensor]]: ...


class TensorLatents:
    """Latents held in memory: ``latents (N, C, h, w)`` and integer ``labels (N,)``."""

    def __init__(self, latents: Tensor, labels: Tensor) -> None:
        if latents.ndim != 4 or labels.shape != latents.shape[:1]:
            raise ValueError(f"expected latents (N, C, h, w) and labels (N,), got {tuple(latents.shape)} and "
                             f"{tuple(labels.shape)}")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("the training latents contain NaN/Inf; re-extract them")
        self.latents, self.labels = latents, labels.long()

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batches(self, indexer: StepIndexer, start: int, end: int, rank: int) -> Iterator[tuple[Tensor, Tensor]]:
        for step in range(start, end):
            idx = indexer.indices(step, rank)
            yield self.latents[idx], self.labels[idx]


class _StepBatchSampler:
    def __init__(self, indexer: StepIndexer, start: int, end: int, rank: int) -> None:
        self.indexer, self.start, self.end, self.rank = indexer, start, end, rank

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.end):
            yield self.indexer.indices(step, self.rank).tolist()

    def __len__(self) -> int:
        return self.end - self.start


class DatasetLatents:
    """A map-style dataset of ``(latent (C, h, w), label)`` (e.g. ``LatentCache``), read with a DataLoader whose
    batch order is the :class:`StepIndexer`'s, so workers do not change which samples a step sees."""

    def __init__(self, dataset: Dataset, num_workers: int = 0) -> None:
        self.dataset, self.num_workers = dataset, num_workers

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batches(self, indexer: StepIndexer, start: int, end: int, rank: int) -> Iterator[tuple[Tensor, Tensor]]:
        loader = DataLoader(self.dataset, batch_sampler=_StepBatchSampler(indexer, start, end, rank),
                            num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
        for x, y in loader:
            yield x, torch.as_tensor(y).long()


# ----------------------------------------------------------------------------- trainer
def config_digest(cfg: ImageRunConfig, keys: tuple[str, ...] = RESUME_KEYS) -> dict[str, str]:
    """A short hash per config section, to refuse resuming with a different model/flow/data/optimizer."""
    d = to_dict(cfg)
    return {k: hashlib.sha1(json.dumps(d[k], sort_keys=True).encode()).hexdigest()[:12] for k in keys}


def _make_accelerator(mixed_precision: str, device: str | None) -> Any:
    from accelerate import Accelerator

    cpu = device == "cpu" or not torch.cuda.is_available()
    if mixed_precision == "auto":
        mixed_precision = "bf16" if (not cpu and torch.cuda.is_bf16_supported()) else "no"
    if cpu and mixed_precision != "no":
        mixed_precision = "no"  # CPU autocast in bf16 is slow and changes numerics; full precision there
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


Hook = Callable[[int, nn.Module], "dict[str, float] | None"]


class FlowTrainer:
    """Trains ``model`` (a ``v(x, t, y)`` network) on ``data`` with ``flow``; checkpoints/logs under ``out_dir``.

    Hooks ``on_sample(step, ema_model)`` and ``on_eval(step, ema_model) -> metrics`` run on the main process every
    ``train.sample_every`` / ``train.eval_every`` steps and at the end; they must not touch the global RNGs (use
    their own generators) so that they never change the training stream.
    """

    def __init__(
        self,
        model: nn.Module,
        flow: FlowSetup,
        data: LatentSource,
        cfg: ImageRunConfig,
        out_dir: str | Path,
        *,
        null_class: int,
        device: str | None = None,
        on_sample: Hook | None = None,
        on_eval: Hook | None = None,
        progress: bool = True,
        progress_position: int = 0,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.flow, self.data = cfg, flow, data
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.null_class = null_class
        self.on_sample, self.on_eval = on_sample, on_eval
        self.progress, self.progress_position = progress, progress_position
        self.meta = dict(meta or {})
        self.accelerator = _make_accelerator(cfg.train.mixed_precision, device)
        self.device = self.accelerator.device
        self.model = model.to(self.device)
        t, o = cfg.train, cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        warm = o.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0
        )
        self.ema = EMA(self.model, decay=t.ema_decay, warmup=t.ema_warmup)
        self.indexer = StepIndexer(len(data), t.batch_size, t.seed, self.accelerator.num_processes)
        self.step = 0
        self.last_loss = float("nan")

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        epoch, batch = self.indexer.position(self.step)
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema_updates": self.ema.updates,
            "rng": rng_state(),
            "data": {"epoch": epoch, "batch": batch, "seed": self.cfg.train.seed},
            "config_digest": config_digest(self.cfg),
        }

    def save(self) -> Path:
        model = self.accelerator.unwrap_model(self.model)
        meta = {"config": to_dict(self.cfg), "flow": self.flow.mode, "null_class": self.null_class, **self.meta}
        return save_checkpoint(self.ckpt_dir, self.step, model.state_dict(), ema=self.ema.state_dict(),
                               state=self.state(), meta=meta, keep=self.cfg.train.keep_checkpoints)

    def restore(self) -> bool:
        """Load the latest checkpoint under ``out_dir/checkpoints``; ``False`` if there is none."""
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        ckpt = load_checkpoint(path)
        theirs = ckpt.state.get("config_digest", {})
        ours = config_digest(self.cfg)
        changed = [k for k in RESUME_KEYS if k in theirs and theirs[k] != ours[k]]
        if changed:
            raise TrainingError(
                f"cannot resume {path}: config section(s) {', '.join(changed)} differ from the checkpoint's; "
                "use the run's config.yaml or a new --out folder"
            )
        self.model.load_state_dict(ckpt.model)
        if ckpt.ema is not None:
            self.ema.load_state_dict(ckpt.ema, updates=int(ckpt.state.get("ema_updates", 0)))
        self.optimizer.load_state_dict(ckpt.state["optimizer"])
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        set_rng_state(ckpt.state["rng"])
        self.step = ckpt.step
        return True

    # ------------------------------------------------------------------ step
    def _step_generator(self, step: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(_seed(self.cfg.train.seed, step, self.accelerator.process_index))
        return g

    def loss_on(self, model: nn.Module, x1: Tensor, y: Tensor, step: int) -> Tensor:
        """The flow-matching loss of one batch (labels dropped, times and prior drawn from step ``step``'s seed)."""
        from ..loss import flow_matching_loss

        g = self._step_generator(step)
        b = x1.shape[0]
        x1 = self.flow.prepare_data(x1.to(self.device, torch.float32))
        y = y.to(self.device)
        p = self.cfg.train.class_dropout
        if p > 0:
            drop = torch.rand(b, generator=g, device=self.device) < p
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        t = self.flow.time_sampler.sample(b, generator=g, device=self.device, dtype=torch.float32)
        x0 = self.flow.prior(tuple(x1.shape), g, self.device)
        sample = self.flow.path.sample(x0, x1, t)
        with self.accelerator.autocast():
            pred = model(sample.x_t, sample.t, y)
        return flow_matching_loss(self.flow.manifold, pred.float(), sample)

    def train_step(self, forward: nn.Module, raw: nn.Module, x1: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """One optimisation step on a batch (loss, backward, clip, AdamW, LR schedule, EMA); advances ``step``."""
        self.model.train()
        loss = self.loss_on(forward, x1, y, self.step)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss is {loss.item()} at step {self.step}; lower optim.lr or enable optim.grad_clip, "
                "then --resume from the last checkpoint"
            )
        self.accelerator.backward(loss)
        grad_norm = None
        if self.cfg.optim.grad_clip is not None:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(raw)
        self.step += 1
        return loss, grad_norm

    def prepare(self) -> tuple[nn.Module, nn.Module]:
        """Wrap model/optimizer with accelerate; returns ``(forward module, unwrapped model)``."""
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        raw = self.accelerator.unwrap_model(self.model)
        forward = torch.compile(self.model) if self.cfg.train.compile else self.model
        return forward, raw

    def fit(self, resume: bool = False) -> Path:
        """Train to ``train.steps``; returns the final checkpoint folder."""
        cfg, acc = self.cfg, self.accelerator
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        resumed = self.restore() if resume else False
        forward, raw = self.prepare()
        logger = RunLogger(self.out_dir, resume_step=self.step if resumed else None, enabled=acc.is_main_process)
        total = cfg.train.steps
        bar = tqdm(total=total, initial=self.step, desc=f"train {self.flow.mode}", unit="step",
                   disable=not (self.progress and acc.is_main_process), dynamic_ncols=True,
                   position=self.progress_position)
        seen, t_window = 0, time.perf_counter()
        last_path: Path | None = None
        try:
            for x1, y in self.data.batches(self.indexer, self.step, total, acc.process_index):
                loss, grad_norm = self.train_step(forward, raw, x1, y)
                self.last_loss = loss.item()
                seen += x1.shape[0] * acc.num_processes
                bar.update(1)
                if self.step % cfg.train.log_every == 0 or self.step == total:
                    elapsed = time.perf_counter() - t_window
                    ips = seen / max(elapsed, 1e-9)
                    record = {"loss": self.last_loss, "images_per_s": ips, "lr": self.scheduler.get_last_lr()[0]}
                    if grad_norm is not None:
                        record["grad_norm"] = float(grad_norm)
                    logger.log(self.step, record)
                    bar.set_postfix(loss=f"{self.last_loss:.4f}", img_s=f"{ips:.0f}")
                    seen, t_window = 0, time.perf_counter()
                if self.step % cfg.train.checkpoint_every == 0 or self.step == total:
                    acc.wait_for_everyone()
                    if acc.is_main_process:
                        last_path = self.save()
                self._hooks(logger, final=self.step == total)
        finally:
            bar.close()
            logger.close()
        acc.wait_for_everyone()
        if last_path is None:
            last_path = latest_checkpoint(self.ckpt_dir) or self.ckpt_dir
        return last_path

    def _hooks(self, logger: RunLogger, final: bool) -> None:
        if not self.accelerator.is_main_process:
            return
        t = self.cfg.train
        ema_model = self.ema.model
        if self.on_sample is not None and t.sample_every and (self.step % t.sample_every == 0 or final):
            with _preserve_rng():
                self.on_sample(self.step, ema_model)
        if self.on_eval is not None and t.eval_every and (self.step % t.eval_every == 0 or final):
            with _preserve_rng():
                metrics = self.on_eval(self.step, ema_model)
            if metrics:
                logger.log(self.step, metrics)


@contextlib.contextmanager
def _preserve_rng() -> Iterator[None]:
    """Hooks may draw from the global RNGs (e.g. a library's dropout); restore them so training is unaffected."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


