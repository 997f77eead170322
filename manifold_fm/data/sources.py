"""Training data as the trainer sees it: a :class:`DataSource` yields the batch of each step.

A source's batches are a pure function of the step (and of the :class:`BatchPlan`: global batch, seed, process rank
and count), never of what was read before. That is what makes resuming exact: a run restarted at step ``k`` gets the
batches an uninterrupted run would have seen from step ``k`` on.

- :class:`TensorSource`: tensors held in memory (``(N, *shape)`` plus optional integer labels), in a per-epoch
  shuffled order (:class:`StepIndexer`).
- :class:`DatasetSource`: a map-style dataset (e.g. a latent cache, or images for the decoder finetune, unreadable
  ones left out) read by a ``DataLoader`` in that same order, so worker processes do not change which items a step
  sees.
- :class:`SamplerSource`: a distribution to draw from (a toy dataset's ``sample(n, generator)``), with a generator
  seeded by ``(seed, step, rank)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from manifold_fm.errors import InputError

from ..seeding import derive_seed, seeded_generator

Batch = tuple[Tensor, Tensor | None]


@dataclass(frozen=True)
class BatchPlan:
    """How steps map to data: ``batch_size`` is the global batch, split evenly over ``world_size`` processes."""

    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {self.batch_size}")
        if self.batch_size % self.world_size:
            raise InputError(f"batch size {self.batch_size} is not divisible by the {self.world_size} processes")

    @property
    def local_batch(self) -> int:
        return self.batch_size // self.world_size


class DataSource(Protocol):
    """What the trainer reads: ``batches(plan, start, end)`` yields ``(x1, labels or None)`` for steps
    ``start .. end - 1``, this process's share of each global batch."""

    def batches(self, plan: BatchPlan, start: int, end: int) -> Iterator[Batch]: ...


class StepIndexer:
    """Which dataset indices step ``k`` uses on process ``rank``.

    Epoch ``e`` visits ``randperm(n)`` seeded by ``(seed, e)``; it holds ``n // global_batch`` full batches (the
    remainder is dropped), and process ``r`` takes the ``r``-th slice of each global batch. With
    ``drop_last=False`` an epoch holds ``ceil(n / global_batch)`` batches: the last one is completed with the first
    items of the same epoch's order, so every item is used every epoch and every batch is full.
    """

    def __init__(self, n: int, global_batch: int, seed: int, world_size: int = 1, drop_last: bool = True) -> None:
        if global_batch % world_size:
            raise InputError(f"batch size {global_batch} is not divisible by the {world_size} processes")
        if n < (global_batch if drop_last else 1):
            raise InputError(f"the dataset has {n} items, fewer than one batch of {global_batch}; lower the batch size")
        self.n, self.global_batch, self.seed, self.world_size = n, global_batch, seed, world_size
        self.local_batch = global_batch // world_size
        self.drop_last = drop_last
        self.batches_per_epoch = n // global_batch if drop_last else -(-n // global_batch)
        self._epoch: int | None = None
        self._perm: Tensor | None = None

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch index within the epoch)`` of step ``step`` (0-based)."""
        return divmod(step, self.batches_per_epoch)

    def permutation(self, epoch: int) -> Tensor:
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 0xDA7A))
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        assert self._perm is not None
        return self._perm

    def indices(self, step: int, rank: int = 0) -> Tensor:
        epoch, b = self.position(step)
        start = b * self.global_batch + rank * self.local_batch
        perm = self.permutation(epoch)
        if start + self.local_batch <= self.n:
            return perm[start : start + self.local_batch]
        return perm[torch.arange(start, start + self.local_batch) % self.n]  # the last batch, completed


class TensorSource:
    """Samples held in memory: ``data`` of shape ``(N, *point_shape)`` and optional integer ``labels (N,)``.
    ``drop_last``: drop each epoch's incomplete last batch (``False``: complete it, so every item is used every
    epoch; see :class:`StepIndexer`)."""

    def __init__(self, data: Tensor, labels: Tensor | None = None, drop_last: bool = True) -> None:
        if data.ndim < 1 or (labels is not None and labels.shape != data.shape[:1]):
            got = None if labels is None else tuple(labels.shape)
            raise InputError(f"expected data (N, ...) and labels (N,), got {tuple(data.shape)} and {got}")
        if not bool(torch.isfinite(data).all()):
            raise InputError("the training data contain NaN/Inf; re-extract or clean them")
        self.data = data
        self.labels = None if labels is None else labels.long()
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.data.shape[0]

    def batches(self, plan: BatchPlan, start: int, end: int) -> Iterator[Batch]:
        indexer = StepIndexer(len(self), plan.batch_size, plan.seed, plan.world_size, self.drop_last)
        for step in range(start, end):
            idx = indexer.indices(step, plan.rank)
            yield self.data[idx], (None if self.labels is None else self.labels[idx])


class _StepBatchSampler:
    def __init__(self, indexer: StepIndexer, start: int, end: int, rank: int) -> None:
        self.indexer, self.start, self.end, self.rank = indexer, start, end, rank

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.end):
            yield self.indexer.indices(step, self.rank).tolist()

    def __len__(self) -> int:
        return self.end - self.start


class DatasetSource:
    """A map-style dataset of ``(sample, label)`` read with a ``DataLoader`` whose batch order is the
    :class:`StepIndexer`'s (``num_workers`` worker processes).

    ``skip_unreadable``: an image dataset whose unreadable files raise
    :class:`~manifold_fm.data.image_folder.ImageReadError` is read through
    :class:`~manifold_fm.data.guarded.GuardedItems`: such images are left out of their batch (which is then smaller),
    and a batch with none readable stops the run with a message naming a file. A dataset with a
    ``render(indices)`` method (the built-in images) renders each batch at once when read in this process.
    """

    def __init__(self, dataset: Dataset, num_workers: int = 0, skip_unreadable: bool = False) -> None:
        self.dataset, self.num_workers, self.skip_unreadable = dataset, num_workers, skip_unreadable

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batches(self, plan: BatchPlan, start: int, end: int) -> Iterator[Batch]:
        indexer = StepIndexer(len(self), plan.batch_size, plan.seed, plan.world_size)
        sampler = _StepBatchSampler(indexer, start, end, plan.rank)
        if self.skip_unreadable:
            yield from self._guarded(sampler)
            return
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        for x, y in loader:
            yield x, torch.as_tensor(y).long()

    def _guarded(self, sampler: _StepBatchSampler) -> Iterator[Batch]:
        from .guarded import GuardedItems, collate_guarded

        render = getattr(self.dataset, "render", None)
        if self.num_workers == 0 and callable(render):
            for indices in sampler:
                x, y = render(indices)
                yield x, torch.as_tensor(y).long()
            return
        loader = DataLoader(
            GuardedItems(self.dataset, range(len(self))),
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_guarded,
            pin_memory=torch.cuda.is_available(),
        )
        for images, labels, _, bad in loader:
            if not images:
                raise InputError(
                    f"none of the {len(bad)} images of a batch could be read (e.g. {bad[0][1]}); "
                    "remove or repair the unreadable files"
                )
            yield torch.stack(images), torch.as_tensor(labels).long()


class SamplerSource:
    """Draws from a distribution: ``sample(n, generator) -> (n, *point_shape)``. Step ``k`` draws the whole global
    batch from a generator seeded by ``(seed, k, 0, "data")`` and process ``r`` keeps the ``r``-th slice, so the
    examples of a step do not depend on the number of processes. Unlabelled."""

    def __init__(self, sample: Callable[[int, torch.Generator], Tensor]) -> None:
        self.sample = sample

    def batches(self, plan: BatchPlan, start: int, end: int) -> Iterator[Batch]:
        mine = slice(plan.rank * plan.local_batch, (plan.rank + 1) * plan.local_batch)
        for step in range(start, end):
            yield self.sample(plan.batch_size, seeded_generator(plan.seed, step, 0, "data"))[mine], None


__all__ = ["Batch", "BatchPlan", "DataSource", "DatasetSource", "SamplerSource", "StepIndexer", "TensorSource"]
