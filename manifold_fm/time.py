"""Time samplers for training and time-grid shifts for sampling.

Convention: ``t = 0`` is noise, ``t = 1`` is data. Every sampler is a small object with
``sample(n, generator=None, device=None, dtype=None) -> Tensor (n,)`` in ``[0, 1]`` drawn from the given
``torch.Generator`` (so a seeded generator gives reproducible times).

The SD3 / LightningDiT *time shift* with factor ``s`` is defined there on the noise level ``sigma`` (``sigma = 1`` is
noise): ``sigma' = s sigma / (1 + (s - 1) sigma)``. With ``sigma = 1 - t`` this reads, in our convention,

    t' = t / (s - (s - 1) t),        equivalently   1 - t' = s (1 - t) / (1 + (s - 1)(1 - t)).

``s > 1`` pushes times toward **noise** (``t' < t``: more training signal / more sampling steps at high noise, what
high-resolution models want); ``s < 1`` pushes toward data; ``s = 1`` is the identity. The map fixes 0 and 1 and is
monotone, so a shifted grid is still a valid sampling schedule.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor


class TimeSampler(Protocol):
    """Draws ``n`` training times in ``[0, 1]`` from ``generator`` (what :class:`UniformTime`,
    :class:`LogitNormalTime` and :class:`ShiftedTime` are)."""

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor: ...


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Apply the time shift ``t' = t / (s - (s - 1) t)`` (``s = shift > 0``; ``s > 1`` moves ``t`` toward noise)."""
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"time shift must be a finite positive number, got {shift!r}")
    return t / (shift - (shift - 1.0) * t)


def shift_time_grid(grid: Tensor, shift: float) -> Tensor:
    """A sampling schedule with the time shift applied to every grid point (endpoints 0 and 1 are kept)."""
    return shift_time(torch.as_tensor(grid), shift)


def _out(n: int, device: torch.device | str | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    if not (isinstance(n, int) and n >= 0):
        raise ValueError(f"number of times must be a non-negative integer, got {n!r}")
    return torch.device(device or "cpu"), dtype or torch.get_default_dtype()


class UniformTime:
    """``t ~ U[0, 1]``."""

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        dev, dt = _out(n, device, dtype)
        return torch.rand(n, generator=generator, device=dev, dtype=dt)

    def __repr__(self) -> str:
        return "UniformTime()"


class LogitNormalTime:
    """``t = sigmoid(m + s z)``, ``z ~ N(0, 1)`` (SD3's logit-normal; ``mean > 0`` favours data, ``< 0`` noise)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"LogitNormalTime std must be positive, got {std!r}")
        self.mean, self.std = float(mean), float(std)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        dev, dt = _out(n, device, dtype)
        z = torch.randn(n, generator=generator, device=dev, dtype=dt)
        return torch.sigmoid(self.mean + self.std * z)

    def __repr__(self) -> str:
        return f"LogitNormalTime(mean={self.mean:g}, std={self.std:g})"


class ShiftedTime:
    """Times of ``base`` passed through :func:`shift_time` (``shift > 1``: more weight near noise, ``t = 0``)."""

    def __init__(self, base: UniformTime | LogitNormalTime | ShiftedTime, shift: float) -> None:
        shift_time(torch.zeros(1), shift)  # validates shift
        self.base, self.shift = base, float(shift)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        return shift_time(self.base.sample(n, generator=generator, device=device, dtype=dtype), self.shift)

    def __repr__(self) -> str:
        return f"ShiftedTime({self.base!r}, shift={self.shift:g})"


def build_time_sampler(
    name: str, mean: float = 0.0, std: float = 1.0, shift: float = 1.0
) -> UniformTime | LogitNormalTime | ShiftedTime:
    """``"uniform"`` or ``"logit_normal"`` (``mean``, ``std``), wrapped in :class:`ShiftedTime` if ``shift != 1``."""
    if name == "uniform":
        base: UniformTime | LogitNormalTime = UniformTime()
    elif name in ("logit_normal", "logitnormal"):
        base = LogitNormalTime(mean, std)
    else:
        raise ValueError(f"unknown time sampler '{name}'; choose uniform or logit_normal")
    return base if shift == 1.0 else ShiftedTime(base, shift)


__all__ = [
    "LogitNormalTime",
    "ShiftedTime",
    "TimeSampler",
    "UniformTime",
    "build_time_sampler",
    "shift_time",
    "shift_time_grid",
]
