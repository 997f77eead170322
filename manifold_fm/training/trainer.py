"""The one training loop, on accelerate (CPU, one GPU, several GPUs, several machines): toy, image and default runs
and decoder finetuning all train through :class:`Trainer`.

It takes an :class:`~manifold_fm.training.objective.Objective` (what one step optimises: its trainable parts, their
``optim`` settings, the step's losses, backward passes and updates), a :class:`~manifold_fm.data.sources.DataSource`
and the shared ``train`` config section, and knows nothing of flows, images or any one run schema. The objectives are
:class:`~manifold_fm.training.flow_objective.FlowObjective` (flow matching) and
:class:`~manifold_fm.training.decoder_finetune.DecoderObjective` (decoder + discriminator finetuning). Each part is
trained by AdamW (fused on GPUs) with its ``optim`` learning rate, betas, weight decay, gradient clipping and
learning-rate schedule (advanced by that part's own updates); the first part is *the model*, with an EMA copy.

**One stream, any number of processes.** The data of step ``k`` are the global batch's (each process reads its slice)
and the objective draws every random number of step ``k`` for the global batch from a generator seeded by
``(seed, k, 0)``, taking its slice. So 1 process at batch ``B`` and ``N`` processes at global batch ``B`` train on the
same examples with the same noise, and differ only in the order gradients are summed (DDP's all-reduce, float
rounding: ~1e-7 relative per step in float32). On GPUs with several processes, BatchNorm layers of every part become
``SyncBatchNorm`` (batch statistics over the global batch, as in one process); on CPU (gloo) they keep per-process
statistics, so a BatchNorm network trained on several CPU processes differs from one process by more than rounding.

**Exact resume.** The data of step ``k`` are a pure function of ``k`` (the data source's contract), so the stream
does not depend on where a run started. A checkpoint stores every part's weights (the model's in
``model.safetensors``, the others' in ``state.pt``), the EMA, every optimizer and LR schedule, the gradient scaler,
the global RNG states and the open loss window, and a run interrupted at step ``k`` and resumed reaches bitwise the
same weights at step ``n`` (same machine, torch build, thread and process count; a different process count continues
the same stream up to summation order). Its ``meta.json`` lists the training sessions (``sessions``: the step each
started at and the steps it ran), so a resume is proven by the step it started at. ``fingerprint`` sections of the
run's config are stored and must match to resume. Before training, parameters, buffers and EMA weights are checked
equal on every process (as edm2 does): a mismatch stops the run with a message instead of being papered over by
DDP's broadcast.

**No per-step host sync.** The objective's logged values and their finiteness accumulate on the device and are read
every ``train.log_every`` steps, at checkpoints and at the end; a non-finite value stops the run with a message
naming the step range, before any checkpoint of those steps is written.

**Mixed precision** (``train.mixed_precision``): ``bf16`` or ``fp16`` autocast of the forward passes on any device
(``auto``: bf16 on GPUs that support it, full precision on CPU), with a gradient scaler for ``fp16`` (one for all
parts, updated once per step); objectives compute their losses in float32.

**Hooks** (``Hook(every, fn)``) run on the main process (``all_processes``: on every process) every ``every`` steps
and at the end, with the EMA model;
the global RNGs are saved around them, so a hook never changes the training stream; metrics they return are logged.
Time spent outside training steps (hooks such as evaluations, checkpoints) is left out of the progress bar's rate
and ETA, of the logged ``samples_per_s`` and of ``train_seconds``.
**Trackers**: ``train.log_with`` names accelerate trackers (``tensorboard``, ``wandb``, ...); ``metrics.jsonl`` is
always written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import write_text_atomic
from ..data.sources import BatchPlan, DataSource
from ..progress import progress_bar
from ..threads import using_threads
from .checkpoint import (
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    select_checkpoint,
    set_rng_state,
)
from .ema import EMA
from .metrics_log import RunLogger
from .objective import Objective, StepContext
from .run_folder import replace_run_folder
from .schema import OptimConfig, TrainConfig


class TrainingError(ValueError):
    """The training run cannot continue (diverged loss, resume mismatch, an existing run, replicas that disagree);
    the message says what to do."""


@dataclass
class Hook:
    """``fn(step, ema_model) -> metrics or None``, run every ``every`` steps (``None``: never) and at the end.

    ``all_processes``: run it on every process (work split across ranks, e.g. a distributed evaluation whose
    collectives every rank must join); otherwise on the main process only. Only the main process's metrics are
    logged."""

    every: int | None
    fn: Callable[[int, nn.Module], Mapping[str, float] | None]
    all_processes: bool = False


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


def _autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The forward pass's autocast dtype: ``auto`` is bf16 on GPUs that support it, full precision elsewhere."""
    if mixed_precision == "auto":
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if gpu_bf16 else None
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def cpu_only(device: str | None) -> bool:
    """Whether accelerate must be told ``cpu=True``: asked for, or no GPU (without it, processes launched on a
    CPU-only machine each believe they are alone instead of forming gloo ranks)."""
    return device == "cpu" or not torch.cuda.is_available()


def _make_accelerator(device: str | None, log_with: Sequence[str], project_dir: Path) -> Any:
    from accelerate import Accelerator

    cpu = cpu_only(device)
    # Precision is the trainer's (one autocast + scaler on every device; accelerate's does nothing for fp16 on CPU).
    return Accelerator(mixed_precision="no", cpu=cpu, log_with=list(log_with) or None, project_dir=str(project_dir))


def _flat_config(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train.steps": 100, ...}`` with scalar values only (what trackers' hyperparameter tables accept)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_config(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class Trainer:
    """Trains ``objective`` on ``data``; checkpoints and logs under ``out_dir`` (see the module docstring).

    Args:
        objective: what one step optimises (:class:`~manifold_fm.training.objective.Objective`), e.g.
            ``FlowObjective(model, flow, optim, null_class=...)``.
        data: the training batches (:class:`~manifold_fm.data.sources.DataSource`).
        train: the ``train`` config section.
        out_dir: run folder (``checkpoints/``, ``metrics.jsonl``).
        hooks: :class:`Hook` s (sample grids, evaluations).
        meta: stored in every checkpoint's ``meta.json`` (with the objective's ``meta()``, ``train_seconds``,
            ``processes`` and ``sessions``).
        fingerprint: config sections (plain data) a resumed run must share with its checkpoint.
        config: the run's config (plain data), written to ``out_dir/config.yaml`` when training starts.
        device: ``"cpu"`` to force the CPU; default accelerate's choice.
    """

    def __init__(
        self,
        objective: Objective,
        data: DataSource,
        train: TrainConfig,
        out_dir: str | Path,
        *,
        hooks: Sequence[Hook] = (),
        meta: Mapping[str, Any] | None = None,
        fingerprint: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        device: str | None = None,
        progress: bool = True,
        progress_position: int = 0,
    ) -> None:
        self.objective, self.train, self.data = objective, train, data
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.hooks = list(hooks)
        self.meta = dict(meta or {})
        self.fingerprint = config_fingerprint(fingerprint or {})
        self.config = dict(config) if config is not None else None
        self.progress, self.progress_position = progress, progress_position
        self.accelerator = _make_accelerator(device, train.log_with, self.out_dir)
        self.device = self.accelerator.device
        self.autocast_dtype = _autocast_dtype(train.mixed_precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None
        acc = self.accelerator
        objective.setup(train, self.device)
        parts = objective.parts()
        names = [p.name for p in parts]
        if not parts or len(set(names)) != len(names):
            raise ValueError(f"an objective needs at least one part, with distinct names; got {names}")
        self.parts = {p.name: p for p in parts}
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, Any] = {}
        self.schedulers: dict[str, Any] = {}
        for part in parts:
            module = part.module.to(self.device)
            if self.device.type == "cuda" and acc.num_processes > 1:
                # batch statistics over the global batch, as one process computes them (a no-op without BatchNorm)
                module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            self.modules[part.name] = module
            o = part.optim
            self.optimizers[part.name] = torch.optim.AdamW(
                module.parameters(),
                lr=o.lr,
                betas=tuple(o.betas),
                eps=o.eps,
                weight_decay=o.weight_decay,
                fused=self.device.type == "cuda" or None,  # one kernel per step on GPUs; CPU keeps the default
            )
            self.schedulers[part.name] = torch.optim.lr_scheduler.LambdaLR(
                self.optimizers[part.name], lr_lambda(o, train.steps)
            )
        self.model_name = names[0]
        self.model = self.modules[self.model_name]
        self.ema = EMA(self.model, decay=train.ema_decay, warmup=train.ema_warmup)
        per_process = train.batch_size // acc.num_processes if train.batch_size % acc.num_processes == 0 else 0
        if per_process == 0 or per_process % train.grad_accum:
            raise TrainingError(
                f"train.batch_size {train.batch_size} must split evenly over {acc.num_processes} process(es) and "
                f"then into train.grad_accum = {train.grad_accum} micro-batches"
            )
        self.plan = BatchPlan(train.batch_size, train.seed, acc.process_index, acc.num_processes)
        # the modules steps run through: wrapped for data parallelism by prepare(), compiled with train.compile
        self._prepared: dict[str, nn.Module] = dict(self.modules)
        self._forward: dict[str, nn.Module] = dict(self.modules)
        self._raw: dict[str, nn.Module] = dict(self.modules)
        self.step = 0
        self.train_seconds = 0.0  # wall time spent in training steps, accumulated across resumes
        self.terms = tuple(objective.terms)
        self.last_terms: dict[str, float] = {}  # the mean of each term over the last logged window (all processes)
        self.last_loss = float("nan")  # the first term's (the loss)
        self.sessions: list[dict[str, int]] = []  # per fit(): the step it started at and the steps it ran
        self.finished_before = False  # fit(resume=True) found the run already at train.steps and did nothing
        self.stop_requested = False  # request_stop(): end training after this step's hooks (early stopping)
        # the open window, on the device: the sum of each term, the number of steps, a non-finite flag; its first step
        self._window = torch.zeros(len(self.terms) + 2, dtype=torch.float64, device=self.device)
        self._window_start = 0

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        first = self.model_name
        state: dict[str, Any] = {
            "optimizer": self.optimizers[first].state_dict(),
            "scheduler": self.schedulers[first].state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema_updates": self.ema.updates,
            "rng": rng_state(),
            "seed": self.train.seed,
            "config_digest": self.fingerprint,
            "loss_window": {"sum_count": self._window[:-1].cpu(), "start": self._window_start},
            "last_loss": self.last_loss,
            "last_terms": dict(self.last_terms),
        }
        others = [name for name in self.modules if name != first]
        if others:
            state["parts"] = {
                name: {
                    "module": {k: v.detach().cpu() for k, v in self._raw[name].state_dict().items()},
                    "optimizer": self.optimizers[name].state_dict(),
                    "scheduler": self.schedulers[name].state_dict(),
                }
                for name in others
            }
        return state

    def save(self) -> Path:
        meta = {
            **self.objective.meta(),
            "train_seconds": self.train_seconds,
            "train_steps": self.train.steps,  # the length the run was set for (train --resume compares it)
            "processes": self.accelerator.num_processes,
            "sessions": [dict(s) for s in self.sessions],
            **self.meta,
        }
        return save_checkpoint(
            self.ckpt_dir,
            self.step,
            self._raw[self.model_name].state_dict(),
            ema=self.ema.state_dict(),
            state=self.state(),
            meta=meta,
            keep=self.train.keep_checkpoints,
            keep_every=self.train.keep_every,
        )

    def restore(self, checkpoint: str | int | Path | None = None) -> bool:
        """Load the latest checkpoint under ``out_dir/checkpoints`` (or the one ``checkpoint`` names: a step or a
        ``step_*`` folder, :func:`~manifold_fm.training.checkpoint.select_checkpoint`); ``False`` if there is
        none."""
        path = select_checkpoint(self.ckpt_dir, checkpoint)
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
        first = self.model_name
        self._raw[first].load_state_dict(ckpt.model)
        if ckpt.ema is not None:
            self.ema.load_state_dict(ckpt.ema, updates=int(ckpt.state.get("ema_updates", 0)))
        self.optimizers[first].load_state_dict(ckpt.state["optimizer"])
        self.schedulers[first].load_state_dict(ckpt.state["scheduler"])
        for name, saved in ckpt.state.get("parts", {}).items():
            self._raw[name].load_state_dict(saved["module"])
            self.optimizers[name].load_state_dict(saved["optimizer"])
            self.schedulers[name].load_state_dict(saved["scheduler"])
        if self.scaler is not None and ckpt.state.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt.state["scaler"])
        set_rng_state(ckpt.state["rng"])
        self.step = ckpt.step
        self.train_seconds = float(ckpt.meta.get("train_seconds", 0.0))
        self.sessions = [dict(s) for s in ckpt.meta.get("sessions", [])]
        window = ckpt.state.get("loss_window")
        if window is not None:
            self._window[:-1] = window["sum_count"].to(self._window)
            self._window_start = int(window["start"])
        else:
            self._window_start = self.step
        self.last_loss = float(ckpt.state.get("last_loss", float("nan")))
        self.last_terms = dict(ckpt.state.get("last_terms", {}))
        return True

    def request_stop(self) -> None:
        """End training after the current step's hooks, with a checkpoint of that step (early stopping). Asked by a
        hook on the main process, it stops every process at that step (the main process's request is shared)."""
        self.stop_requested = True

    def part_module(self, name: str) -> nn.Module:
        """The unwrapped module of part ``name``, with its current weights."""
        return self._raw[name]

    # ------------------------------------------------------------------ step
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast of the forward passes in ``train.mixed_precision`` (a no-op in full precision)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def context(self, step: int | None = None) -> StepContext:
        """What the objective sees of the trainer for step ``step`` (default: the next step)."""
        acc = self.accelerator
        return StepContext(
            step=self.step if step is None else step,
            seed=self.train.seed,
            device=self.device,
            process_index=acc.process_index,
            num_processes=acc.num_processes,
            grad_accum=self.train.grad_accum,
            modules=self._forward,
            raw=self._raw,
            autocast=self.autocast,
            backward=self._backward,
            no_sync=self._no_sync,
            update=self._update,
            all_reduce_mean=self._all_reduce_mean,
        )

    def _backward(self, loss: Tensor) -> None:
        self.accelerator.backward(self.scaler.scale(loss) if self.scaler is not None else loss)

    def _no_sync(self, name: str) -> contextlib.AbstractContextManager[Any]:
        return self.accelerator.no_sync(self._prepared[name])

    def _update(self, name: str) -> Tensor | None:
        optimizer, clip = self.optimizers[name], self.parts[name].optim.grad_clip
        grad_norm = None
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if clip is not None:
            grad_norm = self.accelerator.clip_grad_norm_(self._prepared[name].parameters(), clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)  # the scaler's update() follows the step's last update (train_step)
        else:
            optimizer.step()
        self.schedulers[name].step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _all_reduce_mean(self, tensor: Tensor) -> Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="mean")

    def train_step(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """One optimisation step on this process's ``batch`` (the objective's step, then the gradient scaler's
        update and the EMA update); advances ``step``. Returns the objective's terms (on the device, not
        synchronised) and the model's gradient norm (``None`` without clipping)."""
        for module in self._prepared.values():
            module.train()
        terms, grad_norm = self.objective.step(self.context(), batch)
        if self.scaler is not None:
            self.scaler.update()
        self.ema.update(self._raw[self.model_name])
        self.step += 1
        if self.sessions:
            self.sessions[-1]["steps"] += 1
        terms = terms.detach().double()
        self._window += torch.cat([terms, terms.new_ones(1), (~torch.isfinite(terms)).any().double().reshape(1)])
        return terms, grad_norm

    def _read_window(self) -> dict[str, float]:
        """Close the window: the mean of each term over its steps and processes (one host sync). Raises
        :class:`TrainingError` if any value in it was not finite."""
        totals = self.accelerator.reduce(self._window.clone(), reduction="sum")
        first, last = self._window_start + 1, self.step
        self._window.zero_()
        self._window_start = self.step
        *sums, count, bad = (float(v) for v in totals.cpu())
        if bad > 0:
            raise TrainingError(
                f"the loss was not finite in steps {first}..{last} (no checkpoint after step {first - 1} was "
                "written); lower optim.lr or enable optim.grad_clip, then --resume from the last checkpoint"
            )
        return {name: value / max(count, 1.0) for name, value in zip(self.terms, sums, strict=True)}

    def prepare(self) -> None:
        """Wrap every part's module and optimizer with accelerate (data parallelism), then compile the forward
        modules with ``train.compile``."""
        names = list(self.modules)
        prepared = self.accelerator.prepare(*(self.modules[n] for n in names), *(self.optimizers[n] for n in names))
        for i, name in enumerate(names):
            module, self.optimizers[name] = prepared[i], prepared[len(names) + i]
            self._prepared[name] = module
            self._raw[name] = self.accelerator.unwrap_model(module)
            self._forward[name] = torch.compile(module) if self.train.compile else module
        self.model = self._prepared[self.model_name]

    def check_replicas(self, when: str) -> None:
        """Raise :class:`TrainingError` unless every process holds the same parameters, buffers and EMA weights
        (each compared with the main process's by a broadcast; a no-op in one process)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        import torch.distributed as dist

        named: list[tuple[str, Tensor]] = []
        for name, module in self.modules.items():
            prefix = "" if name == self.model_name else f"{name}."
            named += [(prefix + k, v) for k, v in (*module.named_parameters(), *module.named_buffers())]
        named += [("ema." + k, v) for k, v in self.ema.model.state_dict().items()]
        differ = [name for name, tensor in named if not _same_as_main(tensor.detach())]
        flag = torch.tensor([float(len(differ))], device=self.device)
        dist.all_reduce(flag)
        if float(flag) > 0:
            where = f" (process {acc.process_index}: {', '.join(differ[:3])}...)" if differ else ""
            raise TrainingError(
                f"the {acc.num_processes} processes hold different weights {when}{where}; every process must build "
                "the model from the same seed and read the same checkpoint"
            )

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = False, overwrite: bool = False, checkpoint: str | int | Path | None = None) -> Path:
        """Train to ``train.steps``; returns the final checkpoint folder. ``overwrite``: first delete the run in
        ``out_dir`` (:func:`~manifold_fm.training.run_folder.replace_run_folder`). ``resume``: continue from the
        latest checkpoint (``checkpoint``: from the one it names, a step or a ``step_*`` folder); with none yet the
        run starts at step 0. A run whose checkpoint is already at ``train.steps`` is left as it is: nothing is
        trained or written (``finished_before`` becomes true), and the trainer holds its weights.

        Raises:
            TrainingError: ``out_dir`` already holds a checkpoint and neither ``resume`` nor ``overwrite`` is set;
                the checkpoint is beyond ``train.steps``; the loss is not finite; the checkpoint's config differs;
                the processes disagree.
            InputError: ``overwrite`` with ``resume``, or ``out_dir`` holds something that is not a run.
            CheckpointError: ``checkpoint`` names no kept checkpoint, or the checkpoint is unreadable.
        """
        if overwrite:  # every process checks (so all stop together), then the main one deletes
            replace_run_folder(self.out_dir, resume=resume, delete=False)
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                replace_run_folder(self.out_dir)
            self.accelerator.wait_for_everyone()
        existing = latest_checkpoint(self.ckpt_dir)
        if existing is not None and not resume:
            raise TrainingError(
                f"{self.out_dir} already holds a run (checkpoint {existing.name}); "
                "pass --resume to continue it, --overwrite to replace it, or choose another --out"
            )
        resumed = self.restore(checkpoint) if resume else False
        if resumed and self.step > self.train.steps:
            raise TrainingError(
                f"{self.out_dir} is at step {self.step}, beyond train.steps = {self.train.steps}; resume with at "
                "least that many steps, or --checkpoint an earlier step"
            )
        self.accelerator.wait_for_everyone()  # nobody writes before every process has looked
        if resumed and self.step == self.train.steps:
            self.finished_before = True  # nothing to train: write nothing (config, log, checkpoint)
            return select_checkpoint(self.ckpt_dir, checkpoint) or self.ckpt_dir
        if self.config is not None and self.accelerator.is_main_process:
            import yaml

            write_text_atomic(self.out_dir / "config.yaml", yaml.safe_dump(self.config, sort_keys=False))
        with using_threads(self.train.threads or torch.get_num_threads()):  # train.threads null: keep the count
            return self._fit(resumed)

    def _fit(self, resumed: bool) -> Path:
        acc, total = self.accelerator, self.train.steps
        self.check_replicas("after resuming" if resumed else "at the start")
        self.prepare()
        self.sessions.append({"start": self.step, "steps": 0})
        logger = RunLogger(
            self.out_dir,
            resume_step=self.step if resumed else None,
            enabled=acc.is_main_process,
            accelerator=acc if self.train.log_with else None,
            tracker_config=_flat_config(self.config or {}),
            run_name=self.out_dir.name,
        )
        bar = progress_bar(
            total=total,
            initial=self.step,
            desc=f"train {self.objective.name}",
            unit="step",
            disable=not (self.progress and acc.is_main_process),
            dynamic_ncols=True,
            position=self.progress_position,
        )
        if not resumed:
            self._window_start = self.step
        seen, t_window = 0, time.perf_counter()
        last_path: Path | None = None
        try:
            t_fit = time.perf_counter()
            for batch in self.data.batches(self.plan, self.step, total):
                _, grad_norm = self.train_step(batch)
                now = time.perf_counter()
                self.train_seconds += now - t_fit
                t_fit = now
                seen += batch[0].shape[0] * acc.num_processes
                bar.update(1)
                log = self.step % self.train.log_every == 0 or self.step == total
                checkpoint = self.step % self.train.checkpoint_every == 0 or self.step == total
                if log:
                    self.last_terms = self._read_window()
                    self.last_loss = self.last_terms[self.terms[0]]
                    ips = seen / max(time.perf_counter() - t_window, 1e-9)
                    lr = self.schedulers[self.model_name].get_last_lr()[0]
                    record = {**self.last_terms, "samples_per_s": ips, "lr": lr}
                    if grad_norm is not None:
                        record["grad_norm"] = float(grad_norm)
                    logger.log(self.step, record)
                    bar.set_postfix(loss=f"{self.last_loss:.4f}", per_s=f"{ips:.0f}")
                    seen, t_window = 0, time.perf_counter()
                t_other = time.perf_counter()
                if checkpoint:
                    if not log:  # never checkpoint a step whose loss was not finite
                        self._check_window()
                    acc.wait_for_everyone()
                    if acc.is_main_process:
                        last_path = self.save()
                self._run_hooks(logger, final=self.step == total)
                # checkpoints and hooks (evaluations) are not training time: leave them out of train_seconds, the
                # logged throughput and the progress bar's rate, so its ETA does not jump after an evaluation
                t_fit = time.perf_counter()
                t_window += t_fit - t_other
                _leave_out(bar, t_fit - t_other)
                if self.stop_requested:
                    break
            latest = latest_checkpoint(self.ckpt_dir)
            if acc.is_main_process and (latest is None or checkpoint_step(latest) != self.step):
                last_path = self.save()  # e.g. train.steps = 0: the initial weights, so the run can be loaded
        finally:
            bar.close()
            logger.close()
        acc.wait_for_everyone()
        return last_path or latest_checkpoint(self.ckpt_dir) or self.ckpt_dir

    def _check_window(self) -> None:
        """Raise if a value of the open window was not finite (one host sync), keeping the window open."""
        bad = self.accelerator.reduce(self._window[-1:].clone(), reduction="sum")
        if float(bad) > 0:
            self._read_window()  # raises, naming the steps

    def _run_hooks(self, logger: RunLogger, final: bool) -> None:
        main = self.accelerator.is_main_process
        fired = False
        for hook in self.hooks:
            if hook.every and (self.step % hook.every == 0 or final):
                fired = True
                if main or hook.all_processes:
                    with _preserve_rng():
                        metrics = hook.fn(self.step, self.ema.model)
                    if metrics and main:
                        logger.log(self.step, metrics)
        if fired and self.accelerator.num_processes > 1:
            # a main-process hook may have asked to stop (early stopping): every process stops at the same step, or
            # the others would wait for it in the next step's gradient all-reduce. Hooks fire at the same steps on
            # every process, so this broadcast is matched (and costs one host read per hook step, none otherwise).
            self.stop_requested = _main_flag(self.stop_requested, self.device)


def _leave_out(bar: Any, seconds: float) -> None:
    """Shift a tqdm bar's clock by ``seconds``, so its elapsed time, rate and ETA count none of them."""
    if not bar.disable:
        bar.start_t += seconds
        bar.last_print_t += seconds


def _main_flag(flag: bool, device: torch.device) -> bool:
    """The main process's value of ``flag``, on every process."""
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def _same_as_main(tensor: Tensor) -> bool:
    """Whether ``tensor`` equals the main process's copy (NaNs compare equal)."""
    import torch.distributed as dist

    main = tensor.clone()
    dist.broadcast(main, src=0)
    return torch.equal(torch.nan_to_num(tensor), torch.nan_to_num(main))


#: The step of a checkpoint folder, from its name (``step_00001000``).
load_step = checkpoint_step


@contextlib.contextmanager
def _preserve_rng() -> Iterator[None]:
    """Hooks may draw from the global RNGs (e.g. a library's dropout); restore them so training is unaffected."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


__all__ = ["Hook", "Trainer", "TrainingError", "config_fingerprint", "cpu_only", "load_step", "lr_lambda"]
