"""The flow-matching loss on a manifold (the SFM paper's tangent-projected MSE).

For a network output ``v`` at ``x_t`` and the path's target ``u_t``:

    L = | P_{x_t} v - P_{x_t} u_t |^2,

with ``P_x`` the manifold's tangent projection (``proju``). Projecting the network output means only its tangent
part is trained (the normal part is discarded by the sampler anyway); projecting the target is a no-op for exact
targets and removes rounding-level normal components. ``P`` is linear, so ``P v - P u = P (v - u)``.

Metrics:
- ``"ambient"``: the squared Euclidean norm of the ambient difference (equal to the Riemannian one on embedded
  manifolds with the induced metric: spheres, token spheres, the flat torus, Euclidean space);
- ``"riemannian"``: ``<d, d>_{x_t}`` from ``manifold.inner`` (differs on e.g. the Poincaré ball, whose metric is
  ``lambda(x)^2`` times the Euclidean one).

Reductions:
- ``"none"``: ambient -> the elementwise squared error (shape of ``pred``); riemannian -> ``<d, d>_{x_t}`` divided by
  the number of ambient entries per point (the manifold's batch shape, e.g. ``(B,)`` or ``(B, N)``);
- ``"per_sample"``: shape ``(B,)``: the mean over every non-batch axis (for riemannian: the summed squared norm divided
  by the number of entries per sample, so both metrics agree for induced metrics), for per-sample loss weighting;
- ``"mean"``: the mean of ``"per_sample"`` (a scalar).

Low-precision ``pred`` (bf16/fp16) is compared in float32.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .manifolds import Manifold
from .paths import PathSample

Reduction = Literal["mean", "per_sample", "none"]
Metric = Literal["ambient", "riemannian"]


def flow_matching_loss(
    manifold: Manifold,
    pred: Tensor,
    sample: PathSample,
    reduction: Reduction = "mean",
    metric: Metric = "ambient",
) -> Tensor:
    """``|P_{x_t} pred - P_{x_t} u_t|^2`` reduced as documented in the module docstring.

    Args:
        manifold: the manifold of the path (``path.manifold``); for a :class:`~manifold_fm.paths.LinearPath` this is
            Euclidean, so nothing is projected.
        pred: the network's ambient velocity at ``sample.x_t`` (same shape).
        sample: the :class:`~manifold_fm.paths.PathSample` the prediction was made on.
        reduction: ``"mean"``, ``"per_sample"`` or ``"none"``.
        metric: ``"ambient"`` or ``"riemannian"``.
    """
    if pred.shape != sample.x_t.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} differs from the path sample's x_t shape {tuple(sample.x_t.shape)}"
        )
    if reduction not in ("mean", "per_sample", "none"):
        raise ValueError(f"unknown reduction '{reduction}'; choose mean, per_sample or none")
    if metric not in ("ambient", "riemannian"):
        raise ValueError(f"unknown metric '{metric}'; choose ambient or riemannian")
    dtype = torch.promote_types(pred.dtype, torch.float32)
    x_t = sample.x_t.to(dtype)
    diff = manifold.proju(x_t, pred.to(dtype) - sample.u_t.to(dtype))
    batch = pred.shape[0]
    if metric == "ambient":
        sq = diff.square()
        if reduction == "none":
            return sq
        per_sample = sq.reshape(batch, -1).mean(dim=1)
    else:
        per_point = manifold.inner(x_t, diff, diff)
        entries_per_point = max(1, diff.numel() // max(1, per_point.numel()))
        if reduction == "none":
            return per_point / entries_per_point
        per_sample = per_point.reshape(batch, -1).sum(dim=1) / (diff[0].numel())
    return per_sample if reduction == "per_sample" else per_sample.mean()


__all__ = ["flow_matching_loss"]
