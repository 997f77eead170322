"""Exponential moving average of model parameters (``theta_ema <- decay * theta_ema + (1 - decay) * theta``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn


class EMA:
    """A float32 shadow copy of a model's parameters and buffers, updated in place after each optimizer step.

    ``warmup``: if > 0, the effective decay is ``min(decay, (1 + n) / (warmup + n))`` after ``n`` updates, so early
    averages are not dominated by the random initialisation (as in many SiT/DiT training scripts' EMA warm-up).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    def current_decay(self) -> float:
        if self.warmup <= 0:
            return self.decay
        return min(self.decay, (1 + self.updates) / (self.warmup + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current parameters (buffers are copied)."""
        d = self.current_decay()
        src = dict(model.named_parameters())
        ema_params = [p for n, p in self.model.named_parameters() if n in src]
        new = [src[n].detach().float() for n, _ in self.model.named_parameters() if n in src]
        torch._foreach_lerp_(ema_params, new, 1.0 - d)
        for (_, b_ema), (_, b) in zip(self.model.named_buffers(), model.named_buffers(), strict=True):
            b_ema.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor], updates: int | None = None) -> None:
        self.model.load_state_dict(state)
        if updates is not None:
            self.updates = updates
