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

Host reads (``manifolds.numerics.branch_on_host``): on an accelerator, all classes are solved at once as one
block-diagonal problem (data sorted by class, infinite cost between classes), so a step's only read is the exact
solver's one transfer of the cost matrix to the CPU (scipy is the algorithm; the permutation comes back as an
upload), and the Sinkhorn path reads nothing. On the CPU, where reads are free, classes are solved one by one (no
cost computed between classes) and Sinkhorn stops as soon as it converges; the assignments are the same.
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
from .manifolds.numerics import branch_on_host

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


def _assign(cost: np.ndarray, max_exact: int) -> np.ndarray:
    """Row permutation ``p`` with ``sum_j cost[p[j], j]`` minimal, per diagonal block of finite costs (the classes:
    ``+inf`` between them) and within each in consecutive pieces of ``max_exact`` rows beyond that size."""
    n = cost.shape[0]
    ends = np.flatnonzero(np.isposinf(cost[np.arange(1, n), np.arange(n - 1)])) + 1  # where a new class starts
    perm = np.arange(n)
    for lo, hi in zip(np.r_[0, ends], np.r_[ends, n], strict=True):
        for s in range(lo, hi, max_exact):
            e = min(s + max_exact, hi)
            rows, cols = linear_sum_assignment(cost[s:e, s:e])
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


def _check_groups(groups: Tensor | None, n: int, m: int) -> None:
    if groups is not None and (n != m or groups.shape != (n,)):
        raise InputError(f"groups split a square cost into blocks: got cost {(n, m)} and groups {tuple(groups.shape)}")


def _group_sum(values: Tensor, groups: Tensor) -> Tensor:
    """``out[k] = sum of values[i] over groups[i] == k``, shape ``(n,)`` (group ids are below ``n``)."""
    return torch.zeros_like(values).scatter_add_(0, groups, values)


@torch.no_grad()
def sinkhorn_log_plan(
    cost: Tensor,
    reg: float = 0.05,
    *,
    groups: Tensor | None = None,
    max_iter: int = 500,
    tol: float = 1e-3,
    check_every: int = 10,
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

    ``groups`` (square costs only): a nondecreasing ``(n,)`` group id per row, the same per column, splitting the
    problem into independent diagonal blocks (classes) solved at once, each exactly as alone (its own marginals
    ``1 / n_k``, ``eps`` and stopping); entries between blocks get ``log_plan = -inf``.

    Iterations alternate the two potential updates (the column marginals are then exact), starting at ``reg = 1``
    and shrinking it by ``_REG_DECAY`` per iteration to ``reg`` (epsilon scaling), for at most ``max_iter``
    iterations. Every ``check_every`` iterations at the final ``reg`` the row-marginal error ``sum_i |P_i. - 1/n|``
    of each block is computed, and a block whose error is below ``tol`` keeps its potentials from then on. On the CPU
    the loop stops once every block has; elsewhere it runs on (the same values) rather than read the flags on the
    host. Returns ``(n, m)``.
    """
    _check_sinkhorn_args(reg, max_iter, tol, check_every)
    if cost.ndim != 2 or 0 in cost.shape:
        raise InputError(f"cost must be a non-empty (n, m) matrix, got shape {tuple(cost.shape)}")
    c = cost.detach().to(torch.promote_types(cost.dtype, torch.float32))
    n, m = c.shape
    _check_groups(groups, n, m)
    if groups is None:
        outside = None
        c = c - c.mean(1, keepdim=True) - c.mean(0, keepdim=True) + c.mean()  # same plan, better conditioned
        scale = c.std(correction=0)
        log_a, log_b = c.new_tensor(-math.log(n)), c.new_tensor(-math.log(m))
    else:  # the same per block: means, spread and marginals of each row's (= column's) block
        outside = groups[:, None] != groups[None, :]
        size = _group_sum(torch.ones_like(c[0]), groups)[groups]
        inside = c.masked_fill(outside, 0.0)
        row_mean, col_mean = inside.sum(1) / size, inside.sum(0) / size
        block_mean = _group_sum(row_mean, groups)[groups] / size
        c = (c - row_mean[:, None] - col_mean[None, :] + block_mean[:, None]).masked_fill_(outside, 0.0)
        scale = (_group_sum(c.square().sum(1), groups)[groups] / size.square()).sqrt()
        log_a = log_b = -size.log()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant cost: any plan is optimal
    rows, cols = scale.reshape(-1, 1), scale.reshape(1, -1)  # eps of each row's and column's block, over reg
    f, g = c.new_zeros(n), c.new_zeros(m)
    done = torch.zeros(n if groups is not None else (), dtype=torch.bool, device=c.device)  # per block id
    frozen = done
    r = max(reg, 1.0)
    work = torch.empty_like(c)  # one (n, m) buffer for every iteration: no allocation in the loop
    for it in range(1, max_iter + 1):
        last = r  # the reg of this iteration's updates (the plan is returned with it)
        torch.sub(g[None, :], c, out=work).div_(rows * r)
        f_new = (scale * r) * (log_a - _lse(work if outside is None else work.masked_fill_(outside, -math.inf), 1))
        if r == reg and it % check_every == 0:
            # the row sums of the current plan (f, g) are a * exp((f - f_new) / eps): its marginal error, for free
            err = ((f - f_new) / (scale * r)).exp().sub(1).abs() * log_a.exp()
            done = done | ((err.sum() if groups is None else _group_sum(err, groups)) < tol)
            frozen = done if groups is None else done[groups]
            if branch_on_host(c) and bool(done.all()):
                break
        f = torch.where(frozen, f, f_new)  # a converged block keeps f, and so g: the update below reproduces it
        torch.sub(f[:, None], c, out=work).div_(cols * r)
        g = (scale * r) * (log_b - _lse(work if outside is None else work.masked_fill_(outside, -math.inf), 0))
        r = max(reg, r * _REG_DECAY)
    log_plan = (f[:, None] + g[None, :] - c) / (rows * last)  # reg's eps unless max_iter ran out first
    return log_plan if outside is None else log_plan.masked_fill_(outside, -math.inf)


@torch.no_grad()
def plan_to_permutation(log_plan: Tensor, *, groups: Tensor | None = None) -> Tensor:
    """A permutation ``p`` (``p[j]`` = the row paired with column ``j``) rounded from a square transport plan, given
    as its log (or any score increasing in the plan's mass): greedy by mass, on the plan's device.

    Each round, every unassigned column proposes its highest-mass free row; a row proposed by several columns goes to
    the one that puts the most mass on it (ties: lowest column index) and the others propose again in the next round.
    On a Sinkhorn plan a handful of rounds assign every column (each round assigns at least the free entry of largest
    mass); after ``_MAX_ROUNDS`` (reached only on a plan of ties, such as a constant cost's) the columns left take the
    rows left in order, within their block when ``groups`` (as for :func:`sinkhorn_log_plan`) is given. A column
    whose free rows all have ``-inf`` is left to that last step. On the CPU each round looks at the columns left and
    the loop stops once none is; elsewhere every round looks at all ``n`` (no shape depends on the values) and all
    rounds run, rather than read anything on the host (the same result).

    Why greedy rounding: as ``reg -> 0`` the plan concentrates on the optimal permutation and the greedy rounding
    returns it, and elsewhere it keeps the plan's most confident pairs; it is deterministic (reproducible runs and
    resumes) and vectorised. Sampling each column's row from the plan without replacement would add noise the exact
    solver does not have, leave the last columns whatever rows are left, and needs ``n`` sequential steps.
    """
    if log_plan.ndim != 2 or log_plan.shape[0] != log_plan.shape[1]:
        raise InputError(f"the plan must be square to round to a permutation, got shape {tuple(log_plan.shape)}")
    n = log_plan.shape[0]
    _check_groups(groups, n, n)
    device = log_plan.device
    index = torch.arange(n, device=device)
    perm = torch.full((n,), -1, dtype=torch.long, device=device)
    taken = torch.zeros(n, dtype=torch.bool, device=device)  # rows
    free = torch.ones(n, dtype=torch.bool, device=device)  # columns
    cols = index  # the columns a round looks at: all of them, or on the CPU only those left
    for _ in range(_MAX_ROUNDS):
        if branch_on_host(log_plan):
            cols = torch.nonzero(free).flatten()
            if not cols.numel():
                break
        plan = log_plan if cols is index else log_plan[:, cols]
        score, row = plan.masked_fill(taken[:, None], -math.inf).max(0)
        open_ = free[cols]
        score = score.masked_fill_(~open_, -math.inf)  # assigned columns propose nothing
        best = torch.full((n,), -math.inf, dtype=score.dtype, device=device).scatter_reduce_(0, row, score, "amax")
        win = open_ & (score > -math.inf) & (score == best[row])
        first = torch.full_like(index, n).scatter_reduce_(0, row, torch.where(win, cols, n), "amin")
        win &= first[row] == cols
        perm[cols] = torch.where(win, row, perm[cols])
        taken |= torch.zeros_like(index).scatter_reduce_(0, row, win.long(), "amax").bool()
        free[cols] = open_ & ~win
    # Columns left (tied plans only, e.g. a constant cost): the k-th free column of a block takes its k-th free row.
    block = torch.zeros_like(index) if groups is None else groups
    start = torch.full_like(index, n).scatter_reduce_(0, block, index, "amin")[block]  # first index of each block
    rows_free_first = torch.sort(2 * block + taken.long(), stable=True).indices  # per block: free rows, in order
    before = torch.cumsum(free.long(), 0) - free.long()  # free columns before each column
    rank = before - before[start]
    return torch.where(free, rows_free_first[(start + rank).clamp_max(n - 1)], perm)


class OTCoupling:
    """Minibatch OT with the geodesic cost of ``manifold`` (squared geodesic distance).

    Args:
        manifold: the manifold whose ``dist`` defines the cost (use ``Euclidean()`` for the straight-line baseline:
            squared Euclidean cost, as in torchcfm).
        max_exact: largest batch solved exactly under ``solver="auto"``; under ``"exact"``, larger classes are solved
            exactly within consecutive blocks of this size (an approximation; scipy's solver is cubic).
        solver: ``"exact"`` (scipy on the CPU: one transfer of the cost matrix per call), ``"sinkhorn"`` (entropic OT
            on the cost's device, rounded to a permutation: :func:`sinkhorn_log_plan`, :func:`plan_to_permutation`;
            no host read on an accelerator) or ``"auto"``: exact for batches of at most ``max_exact`` rows, Sinkhorn
            above (chosen from the batch size, which the host knows, not from the class sizes, which it would have to
            read).
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

    def _perm(self, cost: Tensor, groups: Tensor | None, batch: int) -> Tensor:
        """The row permutation pairing the rows of ``cost`` with its columns within each block of ``groups``, on
        ``cost``'s device; ``batch`` rows in all choose the ``auto`` solver."""
        if self.solver == "exact" or (self.solver == "auto" and batch <= self.max_exact):
            if groups is not None:  # infinite between classes: the host finds the blocks in the one transfer
                cost = cost.masked_fill(groups[:, None] != groups[None, :], math.inf)
            # The one device-to-host transfer of an OT step: scipy's exact solver runs on the CPU.
            perm = _assign(cost.detach().to("cpu", torch.float64).numpy(), self.max_exact)
            return torch.as_tensor(perm, device=cost.device)
        return plan_to_permutation(sinkhorn_log_plan(cost, self.reg, groups=groups), groups=groups)

    @torch.no_grad()
    def pair(self, x0: Tensor, x1: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Permute ``x0`` so that ``(x0[i], x1[i])`` is an optimal assignment (Sinkhorn: near-optimal), within each
        class if ``y`` is given."""
        if x0.shape != x1.shape:
            raise InputError(f"x0 has shape {tuple(x0.shape)} but x1 has shape {tuple(x1.shape)}; they must match")
        n = x0.shape[0]
        if y is None:
            perm = self._perm(geodesic_cost_matrix(self.manifold, x0, x1), None, n)
            return x0[perm.to(x0.device)], x1, y
        if y.shape[:1] != (n,):
            raise InputError(f"labels must have shape ({n},) to match the batch, got {tuple(y.shape)}")
        # Data sorted by class (stably); noise row i goes with sorted position i, so class k, the k-th smallest, takes
        # the next n_k noise rows in their given order. groups: the class's rank at each sorted position.
        labels = y.detach().to(x1.device)
        order = torch.sort(labels, stable=True).indices
        ranked, x1_sorted = labels[order], x1[order]
        groups = torch.cat([ranked.new_zeros(1, dtype=torch.long), torch.cumsum(ranked[1:] != ranked[:-1], 0)])
        if branch_on_host(x1):
            # On the CPU the class sizes are free to read, and solving class by class skips the costs between
            # classes (the block-diagonal problem below computes all n^2: cheap on an accelerator, not here).
            perm = torch.empty_like(order)
            ends = torch.cumsum(torch.bincount(groups), 0).tolist()
            for lo, hi in zip([0, *ends[:-1]], ends, strict=True):
                cost = geodesic_cost_matrix(self.manifold, x0[lo:hi], x1_sorted[lo:hi])
                perm[lo:hi] = lo + self._perm(cost, None, n)
        else:
            perm = self._perm(geodesic_cost_matrix(self.manifold, x0, x1_sorted), groups, n)
        src = torch.empty_like(perm).scatter_(0, order, perm)  # data row order[j] takes noise row perm[j]
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
