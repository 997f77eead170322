"""Classifier-free guidance as a velocity field for :func:`manifold_fm.solvers.integrate`.

``v = v_u + s (v_c - v_u)`` on all channels, where ``v_c = model(x, t, y)`` and ``v_u = model(x, t, null_class)``.
Both branches are evaluated in **one** call on a batch of ``2B`` (conditional first, then unconditional). A linear
combination of vectors tangent at ``x`` is tangent at ``x``, so guidance never leaves the tangent space (and the
solver projects anyway).

The optional ``interval=(t_lo, t_hi)`` applies guidance only for ``t_lo <= t <= t_hi`` (per sample; conditional
velocity elsewhere), as in "Applying guidance in a limited interval" (Kynkäänniemi et al. 2024). Time runs from noise
(``t = 0``) to data (``t = 1``). When no sample of the batch is inside the interval, or ``scale == 1``, only the
conditional branch is evaluated (a batch of ``B``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Model = Callable[[Tensor, Tensor, Tensor], Tensor]


def guided_velocity(
    model: Model,
    y: Tensor,
    scale: float,
    null_class: int,
    interval: tuple[float, float] | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """A ``velocity(x, t)`` applying classifier-free guidance of strength ``scale`` to ``model(x, t, y)``.

    Args:
        model: a conditional velocity network ``model(x, t, y)`` (``t`` shape ``(B,)``, ``y`` integer labels).
        y: class labels of shape ``(B,)`` for the batch that will be integrated.
        scale: guidance scale ``s`` (1 = plain conditional; 0 = unconditional).
        null_class: the label the model was trained with for "no class" (label dropout).
        interval: optional ``(t_lo, t_hi)``; guidance only for times inside it.
    """
    if interval is not None:
        lo, hi = (float(v) for v in interval)
        if not lo <= hi:
            raise ValueError(f"guidance interval must satisfy t_lo <= t_hi, got {interval!r}")
    scale = float(scale)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        labels = y.to(x.device)
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels have shape {tuple(labels.shape)} but the batch has {x.shape[0]} samples")
        if scale == 1.0:
            return model(x, t, labels)
        if interval is None:
            inside = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        else:
            inside = (t >= lo) & (t <= hi)
            if not bool(inside.any()):
                return model(x, t, labels)
        null = torch.full_like(labels, null_class)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        v_c, v_u = out.chunk(2)
        guided = v_u + scale * (v_c - v_u)
        if interval is None:
            return guided
        mask = inside.reshape(-1, *([1] * (x.ndim - 1)))
        return torch.where(mask, guided, v_c)

    return velocity


__all__ = ["guided_velocity"]
