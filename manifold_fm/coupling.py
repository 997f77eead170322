"""Couplings: how noise samples ``x0`` are paired with data samples ``x1`` inside a minibatch.

- :class:`IndependentCoupling` keeps the pairs as drawn (the standard flow-matching coupling).
- :class:`OTCoupling` solves the exact minibatch optimal-transport assignment with the manifold's own **geodesic**
  cost ``c(x0_i, x1_j) = dist(x0_i, x1_j)^2`` (for token spheres the product metric, i.e. summed over tokens), by
  ``scipy.optimize.linear_sum_assignment``.

Both return ``(x0, x1, y)`` where ``x1`` and ``y`` keep their order and only ``x0`` is permuted. Since the noise
rows are i.i.d., any permutation of them is still a sample of the prior, and the data/label pairs are never broken.
With labels, OT is solved **within each class**: the noise rows are split (in their given order) into one group per
class with as many rows as the class has data rows, and each group is assigned to its class's data by exact OT. This
is the conditional OT coupling ``pi(x0, x1 | y)``, whose noise marginal per class is still the prior (a global
assignment would bias each class's noise toward that class's data).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .manifolds import Manifold


class Coupling(Protocol):
    """Pairs a batch of noise ``x0`` with data ``x1`` (and labels ``y``): returns ``(x0', x1, y)`` with ``x0'`` a
    permutation of the rows of ``x0`` (so it is still a sample of the prior) and ``x1``, ``y`` unchanged."""

    def pair(self, x0: Tensor, x1: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]: ...


class IndependentCoupling:
    """The identity coupling: ``pair(x0, x1, y) = (x0, x1, y)``."""

    def pair(self, x0: Tensor, x1: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        return x0, x1, y

    def __repr__(self) -> str:
        return "IndependentCoupling()"


def geodesic_cost_matrix(manifold: Manifold, x0: Tensor, x1: Tensor) -> Tensor:
    """``C[i, j] = dist(x0_i, x1_j)^2`` summed over every non-batch axis the manifold leaves, shape ``(B0, B1)``:
    :meth:`Manifold.pairwise_sq_dist <manifold_fm.manifolds.Manifold.pairwise_sq_dist>` in float32 or better
    (batched dot products on spheres and token spheres; ``dist`` on every pair by default)."""
    if x0.shape[1:] != x1.shape[1:]:
        raise ValueError(f"x0 samples have shape {tuple(x0.shape[1:])} but x1 samples {tuple(x1.shape[1:])}")
    dtype = torch.promote_types(x0.dtype, torch.float32)
    return manifold.pairwise_sq_dist(x0.to(dtype), x1.to(dtype))


def _assign(cost: Tensor, max_exact: int) -> np.ndarray:
    """Row permutation ``p`` with ``sum_j cost[p[j], j]`` minimal; blocks of ``max_exact`` beyond that size."""
    c = cost.detach().to("cpu", torch.float64).numpy()
    n = c.shape[0]
    perm = np.arange(n)
    for s in range(0, n, max_exact):
        block = c[s : s + max_exact, s : s + max_exact]
        rows, cols = linear_sum_assignment(block)
        perm[s + cols] = s + rows
    return perm


class OTCoupling:
    """Exact minibatch OT with the geodesic cost of ``manifold`` (squared geodesic distance).

    Args:
        manifold: the manifold whose ``dist`` defines the cost (use ``Euclidean()`` for the straight-line baseline:
            squared Euclidean cost, as in torchcfm).
        max_exact: largest batch solved as one exact assignment (scipy's Hungarian variant is cubic); larger batches
            are solved exactly within consecutive blocks of this size (an approximation, documented).
    """

    def __init__(self, manifold: Manifold, max_exact: int = 1024) -> None:
        if max_exact < 1:
            raise ValueError(f"max_exact must be >= 1, got {max_exact}")
        self.manifold, self.max_exact = manifold, int(max_exact)

    def __repr__(self) -> str:
        return f"OTCoupling({self.manifold!r}, max_exact={self.max_exact})"

    @torch.no_grad()
    def pair(self, x0: Tensor, x1: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Permute ``x0`` so that ``(x0[i], x1[i])`` is an optimal assignment (within each class if ``y`` given)."""
        if x0.shape != x1.shape:
            raise ValueError(f"x0 has shape {tuple(x0.shape)} but x1 has shape {tuple(x1.shape)}; they must match")
        n = x0.shape[0]
        if y is None:
            perm = _assign(geodesic_cost_matrix(self.manifold, x0, x1), self.max_exact)
            return x0[torch.as_tensor(perm, device=x0.device)], x1, y
        if y.shape[:1] != (n,):
            raise ValueError(f"labels must have shape ({n},) to match the batch, got {tuple(y.shape)}")
        src = torch.empty(n, dtype=torch.long)
        y_cpu = y.detach().cpu()
        start = 0
        for cls in torch.unique(y_cpu):  # sorted classes: a deterministic split of the noise rows
            idx = torch.nonzero(y_cpu == cls).flatten()
            noise_rows = torch.arange(start, start + idx.numel())
            start += idx.numel()
            cost = geodesic_cost_matrix(self.manifold, x0[noise_rows.to(x0.device)], x1[idx.to(x1.device)])
            perm = _assign(cost, self.max_exact)
            src[idx] = noise_rows[torch.as_tensor(perm)]
        return x0[src.to(x0.device)], x1, y


def build_coupling(name: str, manifold: Manifold) -> IndependentCoupling | OTCoupling:
    """``"independent"`` or ``"ot"`` (geodesic cost on ``manifold``)."""
    if name == "independent":
        return IndependentCoupling()
    if name == "ot":
        return OTCoupling(manifold)
    raise ValueError(f"unknown coupling '{name}'; choose independent or ot")


__all__ = ["Coupling", "IndependentCoupling", "OTCoupling", "build_coupling", "geodesic_cost_matrix"]
