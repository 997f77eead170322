"""Sampling a trained velocity network with a :class:`~manifold_fm.flow.Flow`: one sampler spec for every run.

:class:`SamplerSpec` holds the solver (any :func:`~manifold_fm.solvers.integrate` method, its steps, transport and
tolerances) and classifier-free guidance (scale and optional ``t`` interval). It is the ``sample`` section of every
run config. :func:`generate` draws the prior and integrates ``dx/dt = P_x v(x, t[, y])`` on the flow's manifold from
``t = 0`` to ``t = 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from .config import Section
from .errors import InputError
from .flow import Flow
from .guidance import guided_velocity
from .precision import Precision, precision_scope
from .solvers import TABLEAUS, adaptive_methods, integrate
from .time import shift_time_grid

Velocity = Callable[[Tensor, Tensor], Tensor]


class SamplerSpec(Section):
    """Solver and guidance settings.

    Attributes:
        method: ``euler``, ``heun``, ``midpoint``, ``rk4`` (exp-map steppers) or a torchdiffeq adaptive method.
        steps: fixed methods: uniform steps; adaptive methods: chart segments.
        transport: how Runge-Kutta stages reach the step's tangent space (:mod:`manifold_fm.solvers`).
        time_shift: fixed methods: the steps follow the time grid ``t_i = i / steps`` warped by
            :func:`~manifold_fm.time.shift_time` (``s > 1`` puts more steps near the noise; 1: uniform steps).
        cfg_scale: classifier-free guidance scale (1 = conditional only).
        cfg_interval: apply guidance only for ``t`` in ``[lo, hi]``.
        atol, rtol: tolerances of adaptive methods.
        precision: ``auto``, ``bf16``, ``tf32`` or ``fp32``: the arithmetic of the network (and of decoding) while
            sampling (:mod:`manifold_fm.precision`; ``auto``: bf16 on CUDA GPUs, fp32 elsewhere).
    """

    method: str = "euler"
    steps: int = Field(50, ge=1)
    transport: Literal["dlog", "parallel", "project", "ambient"] = "dlog"
    time_shift: float = Field(1.0, gt=0)
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] | None = None
    atol: float = Field(1e-5, gt=0)
    rtol: float = Field(1e-5, gt=0)
    precision: Precision = "auto"

    @model_validator(mode="after")
    def _known_method(self) -> SamplerSpec:
        if self.method not in TABLEAUS and self.method not in adaptive_methods():
            raise ValueError(
                f"method: unknown solver {self.method!r}; choose one of {', '.join(TABLEAUS)} or an adaptive "
                f"torchdiffeq method ({', '.join(adaptive_methods())})"
            )
        if self.method not in TABLEAUS and self.transport == "ambient":
            raise ValueError("transport: 'ambient' applies to the fixed-step methods (euler, heun, midpoint, rk4)")
        if self.method not in TABLEAUS and self.time_shift != 1.0:
            raise ValueError("time_shift: applies to the fixed-step methods (euler, heun, midpoint, rk4)")
        if self.cfg_interval is not None and not self.cfg_interval[0] <= self.cfg_interval[1]:
            raise ValueError(f"cfg_interval: needs lo <= hi, got {list(self.cfg_interval)}")
        return self


def model_velocity(
    model: nn.Module, spec: SamplerSpec, labels: Tensor | None = None, null_class: int | None = None
) -> Velocity:
    """``velocity(x, t)`` for the solvers: ``model(x, t)``, ``model(x, t, labels)``, or classifier-free guidance
    (:func:`~manifold_fm.guidance.guided_velocity`) when ``spec.cfg_scale != 1``."""
    if labels is None:
        return lambda x, t: model(x, t)
    if spec.cfg_scale == 1.0:
        return lambda x, t: model(x, t, labels)
    if null_class is None:
        raise ValueError("classifier-free guidance needs the model's null class")
    return guided_velocity(model, labels, spec.cfg_scale, null_class, interval=spec.cfg_interval)


def time_grid(spec: SamplerSpec) -> list[float] | None:
    """The fixed-step solver's times for ``spec``: ``None`` (uniform steps) unless ``spec.time_shift != 1``, then
    the uniform grid ``i / steps`` through :func:`~manifold_fm.time.shift_time`."""
    if spec.time_shift == 1.0:
        return None
    uniform = torch.linspace(0.0, 1.0, spec.steps + 1, dtype=torch.float64)
    return shift_time_grid(uniform, spec.time_shift).tolist()


#: The fixed-step sampler recommended per budget of network evaluations per sample: budget -> (method, time_shift).
#: Chosen by ``python benchmarks/sampling.py nfe`` on the built-in proxy's spherical models, on noise disjoint from
#: the reported samples: a setting replaces plain Euler on the uniform grid only where its gain exceeds the seed
#: spread (``benchmarks/results/sampler_presets.md``, which a test compares with this table).
NFE_PRESETS: dict[int, tuple[str, float]] = {
    4: ("midpoint", 1.0),
    8: ("euler", 1.0),
    16: ("euler", 1.0),
    32: ("euler", 1.0),
    64: ("euler", 1.0),
}


def sampler_for_nfe(nfe: int) -> dict[str, str | int | float]:
    """``method``, ``steps`` and ``time_shift`` of the sampler for at most ``nfe`` network evaluations per sample:
    the preset of the largest budget ``<= nfe`` (:data:`NFE_PRESETS`) with ``steps = nfe // stages`` of its
    method; below the smallest budget, Euler with ``nfe`` uniform steps."""
    if nfe < 1:
        raise InputError(f"nfe must be >= 1 network evaluation per sample, got {nfe}")
    budgets = [b for b in NFE_PRESETS if b <= nfe]
    method, shift = NFE_PRESETS[max(budgets)] if budgets else ("euler", 1.0)
    return {"method": method, "steps": nfe // len(TABLEAUS[method].c), "time_shift": shift}


def network_evaluations(spec: SamplerSpec) -> int | None:
    """Velocity evaluations per sample of a fixed-step ``spec`` (stages x steps; classifier-free guidance doubles
    each evaluation's batch, not their number); ``None`` for adaptive methods (it depends on the tolerances)."""
    tableau = TABLEAUS.get(spec.method)
    return None if tableau is None else len(tableau.c) * spec.steps


@torch.no_grad()
def generate(
    model: nn.Module,
    flow: Flow,
    shape: Sequence[int],
    spec: SamplerSpec,
    *,
    generator: torch.Generator | None = None,
    labels: Tensor | None = None,
    null_class: int | None = None,
) -> Tensor:
    """Samples of shape ``shape`` (batch first): prior noise from ``generator`` (drawn in float32, then cast to the
    model's dtype), integrated with ``spec`` on ``flow.sampling_manifold`` and finished as the flow's data
    (:meth:`Flow.finish <manifold_fm.flow.Flow.finish>`); labels (if any) condition the model. Everything is made on
    the model's device (the labels are moved there; ``generator`` must live there too); the network runs in
    ``spec.precision``. The model runs in eval mode and gets its previous mode back."""
    param = next(model.parameters())
    device = param.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"the noise generator is on {generator.device} but the model on {device}; "
            "create it with torch.Generator(device=<the model's device>)"
        )
    if labels is not None:
        labels = labels.to(device)
    was_training = model.training
    model.eval()
    try:
        x0 = flow.prior(tuple(shape), generator, device, dtype=torch.float32).to(param.dtype)
        velocity = model_velocity(model, spec, labels, null_class)
        with precision_scope(spec.precision, device):
            samples = integrate(
                velocity,
                x0,
                flow.sampling_manifold,
                steps=spec.steps,
                time_grid=time_grid(spec),
                method=spec.method,
                transport=spec.transport,
                atol=spec.atol,
                rtol=spec.rtol,
            )
        return flow.finish(samples)
    finally:
        model.train(was_training)


__all__ = [
    "NFE_PRESETS",
    "SamplerSpec",
    "Velocity",
    "generate",
    "model_velocity",
    "network_evaluations",
    "sampler_for_nfe",
    "time_grid",
]
