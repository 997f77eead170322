"""How many CPU threads torch computes with: one default, one way to set it, one ``--threads`` option.

Small models are dominated by per-operation overhead, and OpenMP threads that wait for each other on shared cores
make them slower, not faster (``manifold-fm sample`` of a tiny image run on one and on two threads, with
byte-identical samples: ``benchmarks/bench_threads.py``, results in ``benchmarks/results/threads.md``). So every
compute command runs on :data:`DEFAULT_THREADS` unless ``--threads N`` says otherwise, and training follows its
config's ``train.threads`` (the same helper applies it). Large models on many cores want more threads: pass
``--threads``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

#: torch intra-op threads of every compute command without ``--threads`` (measured: benchmarks/bench_threads.py).
DEFAULT_THREADS = 1


def pick_threads(requested: int | None = None) -> int:
    """The intra-op thread count to use: ``requested`` (``None``: :data:`DEFAULT_THREADS`), at most the number of
    CPUs, at least 1."""
    n = DEFAULT_THREADS if requested is None else int(requested)
    return max(1, min(n, os.cpu_count() or 1))


def set_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads to :func:`pick_threads` of ``requested``; returns the previous count."""
    import torch  # here, so that a command's --help does not load torch

    previous = torch.get_num_threads()
    torch.set_num_threads(pick_threads(requested))
    return previous


@contextlib.contextmanager
def using_threads(requested: int | None = None) -> Iterator[int]:
    """Compute on :func:`pick_threads` of ``requested`` threads inside the block (yields the count), then restore
    the previous count."""
    import torch

    previous = set_threads(requested)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def threads_text(n: int) -> str:
    """``"1 thread"`` / ``"2 threads"``."""
    return f"{n} thread" if n == 1 else f"{n} threads"


def threads_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--threads N`` option of a compute command: the command runs inside :func:`using_threads` of it. A
    command whose function takes a ``threads`` parameter also receives the value (``None`` when not given)."""
    import click

    passes = "threads" in inspect.signature(fn).parameters

    @functools.wraps(fn)
    def command(*args: Any, threads: int | None = None, **kwargs: Any) -> Any:
        if passes:
            kwargs["threads"] = threads
        with using_threads(threads):
            return fn(*args, **kwargs)

    return click.option(
        "--threads",
        "threads",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help=f"torch CPU threads (default {DEFAULT_THREADS}: small models run several times faster on one thread "
        "than on two; more help large models on many cores).",
    )(command)


__all__ = ["DEFAULT_THREADS", "pick_threads", "set_threads", "threads_option", "threads_text", "using_threads"]
