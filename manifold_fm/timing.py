"""The one timing helper of manifold-fm: ``manifold-fm demo``, the benchmarks (``benchmarks/*.py``) and the GPU check
(``experiments/imagenet_sfm/gpu_check.py``) all time through :func:`timed`.

:func:`timed` runs every function of a set in turn, round after round (interleaved, so all of them see the same
machine load), after ``warmup`` untimed rounds, and records for each call this process's CPU time
(``time.process_time``: robust to other jobs on a shared machine) and the wall time (``time.perf_counter``). With
``sync`` (e.g. ``torch.cuda.synchronize``) the device is synchronised before the clocks start and before they stop,
so asynchronous GPU work is counted in the call that launched it. A :class:`Timing` holds the per-call samples; its
medians (``cpu_s``, ``wall_s``) are what the benchmarks report, ``best_wall_s`` the minimum.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one function over the timed rounds: process CPU time and wall time."""

    cpu: tuple[float, ...]
    wall: tuple[float, ...]

    @property
    def cpu_s(self) -> float:
        """Median CPU seconds per call."""
        return statistics.median(self.cpu)

    @property
    def wall_s(self) -> float:
        """Median wall seconds per call."""
        return statistics.median(self.wall)

    @property
    def best_wall_s(self) -> float:
        """Fastest wall seconds of one call."""
        return min(self.wall)

    def medians(self, cpu: str = "cpu_s", wall: str = "wall_s") -> dict[str, float]:
        """``{cpu: median CPU s, wall: median wall s}``, under the key names a report uses."""
        return {cpu: self.cpu_s, wall: self.wall_s}


def timed(
    fns: Mapping[str, Callable[[], object]],
    reps: int,
    *,
    warmup: int = 1,
    sync: Callable[[], object] | None = None,
) -> dict[str, Timing]:
    """Time each of ``fns`` over ``reps`` interleaved rounds after ``warmup`` untimed rounds (see the module
    docstring); ``sync`` is called before and after every timed call. Returns a :class:`Timing` per name."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):  # allocator, lazy initialisation, autotuning
        for fn in fns.values():
            fn()
    for _ in range(reps):
        for name, fn in fns.items():
            if sync is not None:
                sync()
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            if sync is not None:
                sync()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {k: Timing(tuple(cpu[k]), tuple(wall[k])) for k in fns}


__all__ = ["Timing", "timed"]
