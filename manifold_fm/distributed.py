"""Work split across processes: which chunks of a job each process does, and gathering per-sample rows.

A job of ``n`` items in chunks of ``batch_size`` has chunks ``j = 0 .. ceil(n / batch_size) - 1``; process ``r`` of
``world`` does chunks ``r, r + world, r + 2 world, ...`` (:func:`process_chunks`). Whatever a chunk draws is seeded by
the chunk (e.g. ``(seed, j, "sample")``), so the result does not depend on the number of processes, and every
process knows every other's share without asking. :func:`gather_rows` concatenates the per-item rows of all
processes (e.g. image features, not the images) in item order on every process.

The processes are those of ``torch.distributed`` when it is initialised (``accelerate launch``, ``torchrun``), else
this process alone (:func:`process_share`). The collectives run on the rows' device: CUDA tensors under NCCL, CPU
tensors under gloo.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def process_share() -> tuple[int, int]:
    """``(rank, world_size)`` of this process in the initialised ``torch.distributed`` group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def process_chunks(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int, int]]:
    """``(chunk, start, stop)`` of the chunks process ``rank`` of ``world_size`` does: items ``[start, stop)`` of
    chunk ``j = rank, rank + world_size, ...`` of ``ceil(n / batch_size)`` chunks of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [(j, j * batch_size, min((j + 1) * batch_size, n)) for j in range(rank, -(-n // batch_size), world_size)]


def gather_rows(
    rows: Mapping[str, Tensor], n: int, batch_size: int, *, device: torch.device | str | None = None
) -> dict[str, Tensor]:
    """All processes' per-item rows in item order ``0 .. n-1``, on every process.

    ``rows``: this process's rows, ``{name: (m, ...)}`` with ``m`` its items in the order of
    :func:`process_chunks` (``n``, ``batch_size`` as there); a process without items passes ``{}``. ``device``: where
    the collectives run (the rows' device; needed by a process without rows). One process: ``rows`` as given.
    """
    rank, world = process_share()
    if world == 1:
        return dict(rows)
    import torch.distributed as dist

    counts = [sum(stop - start for _, start, stop in process_chunks(n, batch_size, r, world)) for r in range(world)]
    mine = {k: v.shape[0] for k, v in rows.items()}
    if any(m != counts[rank] for m in mine.values()):
        raise ValueError(f"process {rank} has rows {mine} but its share of {n} items is {counts[rank]}")
    # every process learns the rows' names, trailing shapes and dtypes (a process without items has none)
    layout = {k: (tuple(v.shape[1:]), v.dtype) for k, v in rows.items()} if rows else None
    layouts: list = [None] * world
    dist.all_gather_object(layouts, layout)
    known = next(lay for lay in layouts if lay is not None)
    dev = torch.device(device) if device is not None else next(iter(rows.values())).device
    top = max(counts)
    out: dict[str, Tensor] = {}
    for name, (tail, dtype) in known.items():
        local = rows[name].to(dev) if name in rows else torch.zeros((0, *tail), dtype=dtype, device=dev)
        padded = torch.zeros((top, *tail), dtype=dtype, device=dev)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        # rank r's rows are its chunks in order; put every chunk back at its place in 0 .. n-1
        pieces: dict[int, Tensor] = {}
        for r, part in enumerate(parts):
            at = 0
            for j, start, stop in process_chunks(n, batch_size, r, world):
                pieces[j] = part[at : at + stop - start]
                at += stop - start
        out[name] = torch.cat([pieces[j] for j in sorted(pieces)])
    return out


__all__ = ["gather_rows", "process_chunks", "process_share"]
