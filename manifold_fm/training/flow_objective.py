"""The flow-matching objective: what a toy, image or default run's training step optimises.

One step, for a global batch ``x1`` (this process's share) with optional labels ``y``:

1. labels are replaced by the null class with probability ``train.class_dropout`` (classifier-free guidance);
2. ``t ~ p(t)``, ``x0 ~`` the prior, coupled with the data (:meth:`Flow.pair_and_sample
   <manifold_fm.flow.Flow.pair_and_sample>`), ``(x_t, u_t)`` from the path;
3. the loss ``mean |P_{x_t} (v(x_t, t, y) - u_t)|^2`` (:meth:`Flow.loss <manifold_fm.flow.Flow.loss>`), over
   ``train.grad_accum`` micro-batches;
4. the model's update (AdamW, gradient clipping, learning-rate schedule; the trainer then updates the EMA).

Every random number of step ``k`` (dropout, times, prior) is drawn for the *global* batch from the step's generator
(seeded by ``(seed, k, 0)``) in that order, and each process takes its slice; gradient accumulation slices the same
draws into micro-batches. The geometry runs in float32 (it switches autocast off) and the loss is computed in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..data.sources import Batch
from ..flow import Flow
from .objective import Objective, Part, StepContext
from .schema import OptimConfig, TrainConfig


class FlowObjective(Objective):
    """Flow matching of ``model`` (``model(x_t, t)`` or, with labels, ``model(x_t, t, y)``, returning ambient
    velocities) along ``flow``, trained with ``optim``; ``null_class``: the label classifier-free guidance drops to
    (labelled data only). Logs ``loss``."""

    terms = ("loss",)

    def __init__(self, model: nn.Module, flow: Flow, optim: OptimConfig, *, null_class: int | None = None) -> None:
        self.model, self.flow, self.optim, self.null_class = model, flow, optim, null_class
        self.name = flow.name
        self.class_dropout = 0.0

    def setup(self, train: TrainConfig, device: torch.device) -> None:
        self.class_dropout = train.class_dropout

    def parts(self) -> list[Part]:
        return [Part("model", self.model, self.optim)]

    def meta(self) -> dict[str, Any]:
        return {"flow": self.flow.name, "null_class": self.null_class}

    def draws(
        self, ctx: StepContext, n_local: int, shape: Sequence[int], labelled: bool
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """This process's slice of the step's draws for the global batch (``n_local`` x processes), in the order
        dropout mask, times, prior."""
        n = n_local * ctx.num_processes
        g = ctx.generator()
        drop = None
        if labelled and self.class_dropout > 0:
            drop = torch.rand(n, generator=g, device=ctx.device) < self.class_dropout
        t, x0 = self.flow.draw(n, shape, g, ctx.device, torch.float32)
        mine = ctx.local_slice(n_local)
        return (None if drop is None else drop[mine]), t[mine], x0[mine]

    def _loss(
        self,
        ctx: StepContext,
        model: nn.Module,
        x1: Tensor,
        y: Tensor | None,
        drop: Tensor | None,
        t: Tensor,
        x0: Tensor,
    ) -> Tensor:
        x1 = self.flow.prepare_data(x1.to(ctx.device, torch.float32))
        if y is not None:
            y = y.to(ctx.device)
        sample, y = self.flow.pair_and_sample(x0, x1, t, y)
        if drop is not None and y is not None:
            if self.null_class is None:
                raise ValueError("class dropout needs the model's null_class; pass null_class= or class_dropout 0")
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        with ctx.autocast():
            pred = model(sample.x_t, sample.t) if y is None else model(sample.x_t, sample.t, y)
        return self.flow.loss(pred.float(), sample)

    def loss_on(self, ctx: StepContext, model: nn.Module, x1: Tensor, y: Tensor | None) -> Tensor:
        """The flow-matching loss of ``model`` on this process's batch at ``ctx.step`` (its slice of the step's
        draws), without backward."""
        drop, t, x0 = self.draws(ctx, x1.shape[0], x1.shape[1:], y is not None)
        return self._loss(ctx, model, x1, y, drop, t, x0)

    def step(self, ctx: StepContext, batch: Batch) -> tuple[Tensor, Tensor | None]:
        x1, y = batch
        drop, t, x0 = self.draws(ctx, x1.shape[0], x1.shape[1:], y is not None)
        k = ctx.grad_accum
        m = x1.shape[0] // k
        model = ctx.modules["model"]
        total: Tensor | None = None
        for i in range(k):
            mine = slice(i * m, (i + 1) * m)
            last = i == k - 1
            with contextlib.nullcontext() if last else ctx.no_sync("model"):
                loss = self._loss(
                    ctx,
                    model,
                    x1[mine],
                    None if y is None else y[mine],
                    None if drop is None else drop[mine],
                    t[mine],
                    x0[mine],
                )
                if k > 1:
                    loss = loss / k
                ctx.backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        grad_norm = ctx.update("model")
        assert total is not None
        return total.reshape(1), grad_norm


__all__ = ["FlowObjective"]
