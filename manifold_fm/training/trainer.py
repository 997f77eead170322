"""The flow-matching training loop, on accelerate (CPU, one GPU, several GPUs, several machines): toy, image and
default runs all train through :class:`Trainer`.

It takes a model ``v(x, t[, y])``, a :class:`~manifold_fm.flow.Flow`, a :class:`~manifold_fm.data.sources.DataSource`
and the shared ``train`` and ``optim`` config sections, and knows nothing of images or of any one run schema. One
step, for a batch ``x1`` with optional labels ``y``:

1. labels are replaced by the null class with probability ``train.class_dropout`` (classifier-free guidance);
2. ``t ~ p(t)``, ``x0 ~`` the prior, coupled with the data (:meth:`Flow.sample_path
   <manifold_fm.flow.Flow.sample_path>`), ``(x_t, u_t)`` from the path;
3. the loss ``mean |P_{x_t} (v(x_t, t, y) - u_t)|^2`` (:meth:`Flow.loss <manifold_fm.flow.Flow.loss>`);
4. AdamW with gradient clipping and the learning-rate schedule, then an EMA update.

**Exact resume.** Every random draw of step ``k`` on process ``r`` comes from a generator seeded by ``(seed, k, r)``
and the data of step ``k`` are a pure function of ``k`` (the data source's contract), so the stream of batches and
noise does not depend on where a run started. A checkpoint stores weights, EMA, optimizer, LR schedule and the
global RNG states, and a run interrupted at step ``k`` and resumed reaches bitwise the same weights at step ``n`` on
CPU (same machine, same torch build and thread count). ``fingerprint`` sections (e.g. model, flow, data, optim) of
the run's config are stored and must match to resume.

**Hooks** (``Hook(every, fn)``) run on the main process every ``every`` steps and at the end, with the EMA model;
the global RNGs are saved around them, so a hook never changes the training stream; metrics they return are logged.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..atomic import write_text_atomic
from ..data.sources import BatchPlan, DataSource
from ..flow import Flow
from ..seeding import seeded_generator
from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .ema import EMA
from .metrics_log import RunLogger
from .schema import OptimConfig, TrainConfig


class TrainingError(ValueError):
    """The training run cannot continue (diverged loss, resume mismatch, an existing run); the message says what
    to do."""


@dataclass
class Hook:
    """``fn(step, ema_model) -> metrics or None``, run every ``every`` steps (``None``: never) and at the end."""

    every: int | None
    fn: Callable[[int, nn.Module], Mapping[str, float] | None]


def config_fingerprint(sections: Mapping[str, Any]) -> dict[str, str]:
    """A short hash per config section (plain data), to refuse resuming a run with different settings."""
    return {
        k: hashlib.sha1(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:12]
        for k, v in sections.items()
    }


def lr_lambda(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of step ``s``: linear warm-up ``(s + 1) / warmup_steps``, then ``1`` (constant) or
    ``min_lr_ratio + (1 - min_lr_ratio) (1 + cos(pi p)) / 2`` with ``p`` the progress after warm-up (cosine)."""
    warm = optim.warmup_steps
    if optim.schedule == "constant":
        return lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0
    floor = optim.min_lr_ratio

    def cosine(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        progress = min(1.0, (s - warm) / max(1, total_steps - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return cosine


def _make_accelerator(mixed_precision: str, device: str | None) -> Any:
    from accelerate import Accelerator

    cpu = device == "cpu" or not torch.cuda.is_available()
    if mixed_precision == "auto":
        mixed_precision = "bf16" if (not cpu and torch.cuda.is_bf16_supported()) else "no"
    if cpu and mixed_precision != "no":
        mixed_precision = "no"  # CPU autocast in bf16 is slow and changes numerics; full precision there
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


class Trainer:
    """Trains ``model`` on ``data`` with ``flow``; checkpoints and logs under ``out_dir`` (see the module docstring).

    Args:
        model: ``model(x_t, t)`` or, with labels, ``model(x_t, t, y)``, returning ambient velocities.
        flow: manifold, path, time sampler and coupling.
        data: the training batches (:class:`~manifold_fm.data.sources.DataSource`).
        train, optim: the ``train`` and ``optim`` config sections.
        out_dir: run folder (``checkpoints/``, ``metrics.jsonl``).
        null_class: the label classifier-free guidance drops to (labelled data only).
        hooks: :class:`Hook` s (sample grids, evaluations).
        meta: stored in every checkpoint's ``meta.json`` (with ``flow``, ``null_class`` and ``train_seconds``).
        fingerprint: config sections (plain data) a resumed run must share with its checkpoint.
        config: the run's config (plain data), written to ``out_dir/config.yaml`` when training starts.
        device: ``"cpu"`` to force the CPU; default accelerate's choice.
    """

    def __init__(
        self,
        model: nn.Module,
        flow: Flow,
        data: DataSource,
        train: TrainConfig,
        optim: OptimConfig,
        out_dir: str | Path,
        *,
        null_class: int | None = None,
        hooks: Sequence[Hook] = (),
        meta: Mapping[str, Any] | None = None,
        fingerprint: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        device: str | None = None,
        progress: bool = True,
        progress_position: int = 0,
    ) -> None:
        self.train, self.optim, self.flow, self.data = train, optim, flow, data
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.null_class = null_class
        self.hooks = list(hooks)
        self.meta = dict(meta or {})
        self.fingerprint = config_fingerprint(fingerprint or {})
        self.config = dict(config) if config is not None else None
        self.progress, self.progress_position = progress, progress_position
        self.accelerator = _make_accelerator(train.mixed_precision, device)
        self.device = self.accelerator.device
        self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=optim.lr,
            betas=tuple(optim.betas),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(optim, train.steps))
        self.ema = EMA(self.model, decay=train.ema_decay, warmup=train.ema_warmup)
        acc = self.accelerator
        self.plan = BatchPlan(train.batch_size, train.seed, acc.process_index, acc.num_processes)
        self.step = 0
        self.train_seconds = 0.0  # wall time spent in training steps, accumulated across resumes
        self.last_loss = float("nan")
        self.recent_losses: collections.deque[float] = collections.deque(maxlen=50)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema_updates": self.ema.updates,
            "rng": rng_state(),
            "seed": self.train.seed,
            "config_digest": self.fingerprint,
            "recent_losses": list(self.recent_losses),
        }

    def save(self) -> Path:
        model = self.accelerator.unwrap_model(self.model)
        meta = {"flow": self.flow.name, "null_class": self.null_class, "train_seconds": self.train_seconds, **self.meta}
        return save_checkpoint(
            self.ckpt_dir,
            self.step,
            model.state_dict(),
            ema=self.ema.state_dict(),
            state=self.state(),
            meta=meta,
            keep=self.train.keep_checkpoints,
        )

    def restore(self) -> bool:
        """Load the latest checkpoint under ``out_dir/checkpoints``; ``False`` if there is none."""
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        ckpt = load_checkpoint(path)
        theirs = ckpt.state.get("config_digest", {})
        changed = [k for k in self.fingerprint if k in theirs and theirs[k] != self.fingerprint[k]]
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
        self.train_seconds = float(ckpt.meta.get("train_seconds", 0.0))
        self.recent_losses.extend(ckpt.state.get("recent_losses", []))
        if self.recent_losses:
            self.last_loss = self.recent_losses[-1]
        return True

    # ------------------------------------------------------------------ step
    def _step_generator(self, step: int) -> torch.Generator:
        return seeded_generator(self.train.seed, step, self.accelerator.process_index, device=self.device)

    def loss_on(self, model: nn.Module, x1: Tensor, y: Tensor | None, step: int) -> Tensor:
        """The flow-matching loss of one batch (labels dropped, times and prior drawn from step ``step``'s seed)."""
        g = self._step_generator(step)
        x1 = self.flow.prepare_data(x1.to(self.device, torch.float32))
        drop = None
        if y is not None:
            y = y.to(self.device)
            if self.train.class_dropout > 0:
                drop = torch.rand(x1.shape[0], generator=g, device=self.device) < self.train.class_dropout
        sample, y = self.flow.sample_path(x1, g, y)
        if drop is not None and y is not None:
            if self.null_class is None:
                raise ValueError("class dropout needs the model's null_class; pass null_class= or class_dropout 0")
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        with self.accelerator.autocast():
            pred = model(sample.x_t, sample.t) if y is None else model(sample.x_t, sample.t, y)
        return self.flow.loss(pred.float(), sample)

    def train_step(self, forward: nn.Module, raw: nn.Module, x1: Tensor, y: Tensor | None) -> tuple[Tensor, Any]:
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
        if self.optim.grad_clip is not None:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
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
        forward = torch.compile(self.model) if self.train.compile else self.model
        return forward, raw

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = False) -> Path:
        """Train to ``train.steps``; returns the final checkpoint folder.

        Raises:
            TrainingError: ``out_dir`` already holds a checkpoint and ``resume`` is False; the loss is not finite;
                the checkpoint's config differs.
        """
        existing = latest_checkpoint(self.ckpt_dir)
        if existing is not None and not resume:
            raise TrainingError(
                f"{self.out_dir} already holds a run (checkpoint {existing.name}); "
                "pass --resume to continue it or choose another --out"
            )
        if self.config is not None and self.accelerator.is_main_process:
            import yaml

            write_text_atomic(self.out_dir / "config.yaml", yaml.safe_dump(self.config, sort_keys=False))
        threads = torch.get_num_threads()
        if self.train.threads:
            torch.set_num_threads(max(1, min(self.train.threads, os.cpu_count() or 1)))
        try:
            return self._fit(resume)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, resume: bool) -> Path:
        acc, total = self.accelerator, self.train.steps
        resumed = self.restore() if resume else False
        forward, raw = self.prepare()
        logger = RunLogger(self.out_dir, resume_step=self.step if resumed else None, enabled=acc.is_main_process)
        bar = tqdm(
            total=total,
            initial=self.step,
            desc=f"train {self.flow.name}",
            unit="step",
            disable=not (self.progress and acc.is_main_process),
            dynamic_ncols=True,
            position=self.progress_position,
        )
        seen, t_window = 0, time.perf_counter()
        last_path: Path | None = None
        try:
            t_fit = time.perf_counter()
            for x1, y in self.data.batches(self.plan, self.step, total):
                loss, grad_norm = self.train_step(forward, raw, x1, y)
                now = time.perf_counter()
                self.train_seconds += now - t_fit
                t_fit = now
                self.last_loss = loss.item()
                self.recent_losses.append(self.last_loss)
                seen += x1.shape[0] * acc.num_processes
                bar.update(1)
                if self.step % self.train.log_every == 0 or self.step == total:
                    ips = seen / max(time.perf_counter() - t_window, 1e-9)
                    record = {"loss": self.last_loss, "samples_per_s": ips, "lr": self.scheduler.get_last_lr()[0]}
                    if grad_norm is not None:
                        record["grad_norm"] = float(grad_norm)
                    logger.log(self.step, record)
                    bar.set_postfix(loss=f"{self.last_loss:.4f}", per_s=f"{ips:.0f}")
                    seen, t_window = 0, time.perf_counter()
                if self.step % self.train.checkpoint_every == 0 or self.step == total:
                    acc.wait_for_everyone()
                    if acc.is_main_process:
                        last_path = self.save()
                self._run_hooks(logger, final=self.step == total)
                t_fit = time.perf_counter()  # hooks are not training time
            latest = latest_checkpoint(self.ckpt_dir)
            if acc.is_main_process and (latest is None or load_step(latest) != self.step):
                last_path = self.save()  # e.g. train.steps = 0: the initial weights, so the run can be loaded
        finally:
            bar.close()
            logger.close()
        acc.wait_for_everyone()
        return last_path or latest_checkpoint(self.ckpt_dir) or self.ckpt_dir

    def _run_hooks(self, logger: RunLogger, final: bool) -> None:
        if not self.accelerator.is_main_process:
            return
        for hook in self.hooks:
            if hook.every and (self.step % hook.every == 0 or final):
                with _preserve_rng():
                    metrics = hook.fn(self.step, self.ema.model)
                if metrics:
                    logger.log(self.step, metrics)


def load_step(checkpoint: Path) -> int:
    """The step of a checkpoint folder, from its name (``step_00001000``)."""
    return int(checkpoint.name.split("_")[-1])


@contextlib.contextmanager
def _preserve_rng() -> Iterator[None]:
    """Hooks may draw from the global RNGs (e.g. a library's dropout); restore them so training is unaffected."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


__all__ = ["Hook", "Trainer", "TrainingError", "config_fingerprint", "load_step", "lr_lambda"]
