"""What one training step optimises, as a value the one :class:`~manifold_fm.training.trainer.Trainer` is handed.

An :class:`Objective` names its trainable modules (:class:`Part`: a module and its ``optim`` settings; the first part
is *the model*: the one with an EMA copy, stored as ``model.safetensors`` in checkpoints and handed to hooks), the
values it logs per step (``terms``), and computes one step: forward passes, losses, backward and the updates of its
parts, in whatever order it needs (a GAN updates its generator, then its discriminator). Everything around the step
is the trainer's and serves every objective alike: process setup and data-parallel wrapping, optimizers and
learning-rate schedules, autocast and the fp16 gradient scaler, EMA, checkpoints and exact resume, the loss window
and its logging, hooks, progress and replica checks.

The objective sees the trainer only through a :class:`StepContext`: the step index and its random generator (seeded
by ``(seed, step, 0)`` on the training device, the same on every process, so draws are made for the *global* batch
and each process takes its slice), the forward and raw modules by part name, ``autocast()``, ``backward(loss)``
(gradient scaling included), ``no_sync(part)``, ``update(part)`` (clip, optimizer step, schedule, zero the
gradients) and ``all_reduce_mean(tensor)`` (the mean over processes; the identity in one process). It never touches
accelerate, and it never reads a tensor on the host inside a step.

Objectives: :class:`~manifold_fm.training.flow_objective.FlowObjective` (flow matching: toy, image and default runs)
and :class:`~manifold_fm.training.decoder_finetune.DecoderObjective` (decoder + discriminator finetuning).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..data.sources import Batch
from ..seeding import seeded_generator
from .schema import OptimConfig, TrainConfig


@dataclass
class Part:
    """A trainable module of an objective: ``module`` is trained by AdamW with ``optim``'s learning rate, betas, eps,
    weight decay, schedule (advanced by this part's own updates) and gradient clipping."""

    name: str
    module: nn.Module
    optim: OptimConfig


@dataclass
class StepContext:
    """What the trainer hands an objective for step ``step`` (see the module docstring).

    Attributes:
        step: the 0-based index of the step being taken.
        seed: ``train.seed``.
        device: the training device of this process.
        process_index, num_processes: this process's rank and the number of processes.
        grad_accum: micro-batches per process and step (``train.grad_accum``).
        modules: the modules to run forward passes through, by part name (wrapped for data parallelism and, with
            ``train.compile``, compiled); their backward passes all-reduce the gradients.
        raw: the same modules unwrapped (their parameters are the same tensors).
        autocast: a context manager for forward passes in ``train.mixed_precision`` (a no-op in full precision).
        backward: ``backward(loss)``: back-propagates ``loss`` (scaled by the fp16 gradient scaler when there is one).
        no_sync: ``no_sync(part)``: a context in which backward passes through that part skip the gradient all-reduce
            (gradient accumulation: all but the last micro-batch).
        update: ``update(part)``: unscale, clip to the part's ``optim.grad_clip``, optimizer step, learning-rate
            schedule, zero the gradients; returns the gradient norm before clipping (``None`` without clipping).
        all_reduce_mean: the mean of a tensor over processes (the identity in one process).
    """

    step: int
    seed: int
    device: torch.device
    process_index: int
    num_processes: int
    grad_accum: int
    modules: Mapping[str, nn.Module]
    raw: Mapping[str, nn.Module]
    autocast: Callable[[], AbstractContextManager[Any]]
    backward: Callable[[Tensor], None]
    no_sync: Callable[[str], AbstractContextManager[Any]]
    update: Callable[[str], Tensor | None]
    all_reduce_mean: Callable[[Tensor], Tensor]

    def generator(self) -> torch.Generator:
        """The step's generator, seeded by ``(seed, step, 0)`` on the training device (the same on every process)."""
        return seeded_generator(self.seed, self.step, 0, device=self.device)

    def local_slice(self, n_local: int) -> slice:
        """This process's rows of a draw made for the global batch of ``n_local * num_processes`` rows."""
        return slice(self.process_index * n_local, (self.process_index + 1) * n_local)


class Objective(ABC):
    """What one training step optimises (see the module docstring).

    Attributes:
        name: shown by the progress bar (``train <name>``).
        terms: the names of the values :meth:`step` returns, logged as their mean over each ``train.log_every``
            window and every process; the first is the run's loss (``Trainer.last_loss``). A non-finite value of
            any term stops the run.
    """

    name: str = "objective"
    terms: tuple[str, ...] = ("loss",)

    def setup(self, train: TrainConfig, device: torch.device) -> None:  # noqa: B027 - optional
        """Called once by the trainer before :meth:`parts`: check ``train`` fits the objective, move frozen helpers
        (an encoder, a perceptual network) to ``device``."""

    @abstractmethod
    def parts(self) -> list[Part]:
        """The trainable parts, the model first (built once; the trainer moves and wraps them)."""

    @abstractmethod
    def step(self, ctx: StepContext, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """One optimisation step on this process's ``batch``: losses, backward and ``ctx.update`` of each part.

        Returns the values of :attr:`terms` as a 1-D tensor on the device (not synchronised) and the gradient norm
        of the model's update (``None`` without clipping).
        """

    def meta(self) -> dict[str, Any]:
        """Stored in every checkpoint's ``meta.json``."""
        return {}


__all__ = ["Objective", "Part", "StepContext"]
