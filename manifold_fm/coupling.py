"""Couplings: how noise samples ``x0`` are paired with data samples ``x1`` inside a minibatch.

- :class:`IndependentCoupling` keeps the pairs as drawn (the standard flow-matching coupling).
- :class:`OTCoupling` solves the minibatch optimal-transport assignment with the manifold's own **geodesic** cost
  ``c(x0_i, x1_j) = dist(x0_i, x1_j)^2`` (for token spheres the product metric, i.e. summed over tokens): exactly by
  ``scipy.optimize.linear_sum_assignment`` (on the CPU, cubic in the batch) or, for large batches, approximately by
  an entropic (Sinkhorn) solver on the cost's own device (:func:`sinkhorn_log_plan`) whose plan is rounded to a
  permutation (:func:`plan_to_permutation`).

Both return ``(x0, x1, y)`` where ``x1`` and ``y`` keep their order and only ``x0`` is permuted. Since the noise
rows are i.i.d., any permutation of them is still a sample of the prior, and the data/label pairs are never broken.
With labels, OT is solved **within each class**: the noise rows are split (in their given order) into one group per
class with as many rows as the class has data rows, and each group is assigned to its class's data by OT. This is the
conditional OT coupling ``pi(x0, x1 | y)``, whose noise marginal per class is still the prior (a global assignment
would bias each class's noise toward that class's data).
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .errors import InputError
from .manifolds import Manifold

_SOLVERS = ("exact", "sinkhorn", "auto")
# Epsilon scaling: the Sinkhorn iterations start at reg = 1 and shrink it by this factor per iteration down to the
# requested reg (far fewer iterations than starting at a small reg); the convergence check starts once it is reached.
_REG_DECAY = 0.9
# exp() argument floor in the log-sum-exp: exp(-80) ~ 2e-35 is below float32's resolution of any sum it joins, and
# the floor keeps the CPU off denormals (which made the plain torch.logsumexp ~10x slower at small reg).
_EXP_FLOOR = -80.0
# Rounds of the greedy rounding before the columns left take the rows left in order (a Sinkhorn plan needs < 10).
_MAX_ROUNDS = 64


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
        raise InputError(f"x0 samples have shape {tuple(x0.shape[1:])} but x1 samples {tuple(x1.shape[1:])}")
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


def _lse(x: Tensor, dim: int) -> Tensor:
    """``logsumexp`` along ``dim`` (reduced away), overwriting ``x``; exponents floored at ``_EXP_FLOOR``."""
    m = x.amax(dim, keepdim=True)
    return x.sub_(m).clamp_min_(_EXP_FLOOR).exp_().sum(dim).log_().add_(m.squeeze(dim))


def _check_reg(reg: float) -> None:
    if not (isinstance(reg, (int, float)) and math.isfinite(reg) and reg > 0):
        raise InputError(f"reg must be a finite number > 0, got {reg!r}")


def _check_sinkhorn_args(reg: float, max_iter: int, tol: float, check_every: int) -> None:
    _check_reg(reg)
    if max_iter < 1:
        raise InputError(f"max_iter must be >= 1, got {max_iter}")
    if not tol > 0:
        raise InputError(f"tol must be > 0, got {tol}")
    if check_every < 1:
        raise InputError(f"check_every must be >= 1, got {check_every}")


@torch.no_grad()
def sinkhorn_log_plan(
    cost: Tensor, reg: float = 0.05, *, max_iter: int = 500, tol: float = 1e-3, check_every: int = 10
) -> Tensor:
    """The log of the entropic OT plan between uniform marginals for ``cost`` ``(n, m)``: log-domain Sinkhorn on the
    cost's device, in its dtype promoted to float32 or better.

    The plan ``P = exp(log_plan)`` minimises ``<P, C> - eps H(P)`` subject to ``P 1 = 1/n`` and ``P^T 1 = 1/m`` (total
    mass 1). ``reg`` is **relative**: ``eps = reg * std(C~)``, the standard deviation of the double-centred cost
    ``C~ = C - row means - column means + mean``. Adding a constant per row or column changes neither the optimal plan
    nor ``C~``, and scaling ``C`` scales ``eps`` alike, so ``reg`` means the same on any manifold, scale and
    dimension. (The mean cost would not do: for latents of ``C * H * W`` values the pairwise costs differ by <1% of
    their mean, so a mean-relative ``reg`` would have to shrink with the dimension.) ``reg -> 0`` tends to the exact
    OT plan, large ``reg`` to the independent one.

    Iterations alternate the two potential updates (the column marginals are then exact), starting at ``reg = 1``
    and shrinking it by ``_REG_DECAY`` per iteration to ``reg`` (epsilon scaling), for at most ``max_iter``
    iterations. Every ``check_every`` iterations at the final ``reg`` (the only host synchronisations) the row-marginal
    error ``sum_i |P_i. - 1/n|`` is read, and the solver stops once it is below ``tol``. Returns ``(n, m)``.
    """
    _check_sinkhorn_args(reg, max_iter, tol, check_every)
    if cost.ndim != 2 or 0 in cost.shape:
        raise InputError(f"cost must be a non-empty (n, m) matrix, got shape {tuple(cost.shape)}")
    c = cost.detach().to(torch.promote_types(cost.dtype, torch.float32))
    n, m = c.shape
    c = c - c.mean(1, keepdim=True) - c.mean(0, keepdim=True) + c.mean()  # same plan, better conditioned
    scale = c.std(correction=0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant cost: any plan is optimal
    log_a, log_b = -math.log(n), -math.log(m)
    f = c.new_zeros(n)
    g = c.new_zeros(m)
    r = max(reg, 1.0)
    work = torch.empty_like(c)  # one (n, m) buffer for every iteration: no allocation in the loop
    for it in range(1, max_iter + 1):
        eps = scale * r
        f_new = eps * (log_a - _lse(torch.sub(g[None, :], c, out=work).div_(eps), 1))
        if r == reg and it % check_every == 0:
            # the row sums of the current plan (f, g) are a * exp((f - f_new) / eps): its marginal error, for free
            err = ((f - f_new) / eps).exp().sub(1).abs().sum() * math.exp(log_a)
            if float(err) < tol:
                break
        f = f_new
        g = eps * (log_b - _lse(torch.sub(f[:, None], c, out=work).div_(eps), 0))
        r = max(reg, r * _REG_DECAY)
    return (f[:, None] + g[None, :] - c) / eps  # eps of the last update: reg's unless max_iter ran out first


@torch.no_grad()
def plan_to_permutation(log_plan: Tensor) -> Tensor:
    """A permutation ``p`` (``p[j]`` = the row paired with column ``j``) rounded from a square transport plan, given
    as its log (or any score increasing in the plan's mass): greedy by mass, on the plan's device.

    Each round, every unassigned column proposes its highest-mass free row; a row proposed by several columns goes to
    the one that puts the most mass on it (ties: lowest column index) and the others propose again in the next round.
    On a Sinkhorn plan a handful of rounds assign every column (each round assigns at least the free entry of largest
    mass); after ``_MAX_ROUNDS`` (reached only on a plan of ties, such as a constant cost's) the columns left take the
    rows left in order.

    Why greedy rounding: as ``reg -> 0`` the plan concentrates on the optimal permutation and the greedy rounding
    returns it, and elsewhere it keeps the plan's most confident pairs; it is deterministic (reproducible runs and
    resumes) and vectorised. Sampling each column's row from the plan without replacement would add noise the exact
    solver does not have, leave the last columns whatever rows are left, and needs ``n`` sequential steps.
    """
    if log_plan.ndim != 2 or log_plan.shape[0] != log_plan.shape[1]:
        raise InputError(f"the plan must be square to round to a permutation, got shape {tuple(log_plan.shape)}")
    n = log_plan.shape[0]
    device = log_plan.device
    perm = torch.full((n,), -1, dtype=torch.long, device=device)
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    cols = torch.arange(n, device=device)
    neg_inf = torch.tensor(-math.inf, dtype=log_plan.dtype, device=device)
    for _ in range(_MAX_ROUNDS):
        if not cols.numel():
            return perm
        score, row = log_plan[:, cols].masked_fill(taken[:, None], -math.inf).max(0)
        best = neg_inf.expand(n).clone().scatter_reduce_(0, row, score, "amax")
        win = score == best[row]
        pos = torch.arange(cols.numel(), device=device)
        first = torch.full((n,), cols.numel(), device=device).scatter_reduce_(0, row[win], pos[win], "amin")
        win &= first[row] == pos
        perm[cols[win]] = row[win]
        taken[row[win]] = True
        cols = cols[~win]
    perm[cols] = torch.nonzero(~taken).flatten()  # (near-)tied plans only, e.g. a constant cost: any order will do
    return perm


class OTCoupling:
    """Minibatch OT with the geodesic cost of ``manifold`` (squared geodesic distance).

    Args:
        manifold: the manifold whose ``dist`` defines the cost (use ``Euclidean()`` for the straight-line baseline:
            squared Euclidean cost, as in torchcfm).
        max_exact: largest assignment solved exactly under ``solver="auto"``; under ``"exact"``, larger batches are
            solved exactly within consecutive blocks of this size (an approximation; scipy's solver is cubic).
        solver: ``"exact"`` (scipy on the CPU), ``"sinkhorn"`` (entropic OT on the cost's device, rounded to a
            permutation: :func:`sinkhorn_log_plan`, :func:`plan_to_permutation`) or ``"auto"``: exact for problems of
            at most ``max_exact`` rows (with labels: per class), Sinkhorn above.
        reg: the Sinkhorn regularisation, relative to the spread of the cost (see :func:`sinkhorn_log_plan`).
    """

    def __init__(
        self,
        manifold: Manifold,
        max_exact: int = 1024,
        solver: Literal["exact", "sinkhorn", "auto"] = "auto",
        reg: float = 0.05,
    ) -> None:
        if max_exact < 1:
            raise InputError(f"max_exact must be >= 1, got {max_exact}")
        if solver not in _SOLVERS:
            raise InputError(f"unknown OT solver {solver!r}; choose exact, sinkhorn or auto")
        _check_reg(reg)
        self.manifold, self.max_exact, self.solver, self.reg = manifold, int(max_exact), solver, float(reg)

    def __repr__(self) -> str:
        return f"OTCoupling({self.manifold!r}, max_exact={self.max_exact}, solver={self.solver!r}, reg={self.reg:g})"

    def _perm(self, cost: Tensor) -> Tensor:
        """The row permutation pairing the rows of ``cost`` with its columns, on ``cost``'s device."""
        if self.solver == "exact" or (self.solver == "auto" and cost.shape[0] <= self.max_exact):
            return torch.as_tensor(_assign(cost, self.max_exact), device=cost.device)
        return plan_to_permutation(sinkhorn_log_plan(cost, self.reg))

    @torch.no_grad()
    def pair(self, x0: Tensor, x1: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Permute ``x0`` so that ``(x0[i], x1[i])`` is an optimal assignment (Sinkhorn: near-optimal), within each
        class if ``y`` is given."""
        if x0.shape != x1.shape:
            raise InputError(f"x0 has shape {tuple(x0.shape)} but x1 has shape {tuple(x1.shape)}; they must match")
        n = x0.shape[0]
        if y is None:
            perm = self._perm(geodesic_cost_matrix(self.manifold, x0, x1))
            return x0[perm.to(x0.device)], x1, y
        if y.shape[:1] != (n,):
            raise InputError(f"labels must have shape ({n},) to match the batch, got {tuple(y.shape)}")
        src = torch.empty(n, dtype=torch.long)
        y_cpu = y.detach().cpu()
        start = 0
        for cls in torch.unique(y_cpu):  # sorted classes: a deterministic split of the noise rows
            idx = torch.nonzero(y_cpu == cls).flatten()
            noise_rows = torch.arange(start, start + idx.numel())
            start += idx.numel()
            cost = geodesic_cost_matrix(self.manifold, x0[noise_rows.to(x0.device)], x1[idx.to(x1.device)])
            src[idx] = noise_rows[self._perm(cost).cpu()]
        return x0[src.to(x0.device)], x1, y


def build_coupling(name: str, manifold: Manifold) -> IndependentCoupling | OTCoupling:
    """``"independent"`` or ``"ot"`` (geodesic cost on ``manifold``)."""
    if name == "independent":
        return IndependentCoupling()
    if name == "ot":
        return OTCoupling(manifold)
    raise InputError(f"unknown coupling '{name}'; choose independent or ot")


__all__ = [
    "Coupling",
    "IndependentCoupling",
    "OTCoupling",
    "build_coupling",
    "geodesic_cost_matrix",
    "plan_to_permutation",
    "sinkhorn_log_plan",
]
