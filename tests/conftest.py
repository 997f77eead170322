"""Shared test setup: deterministic, CPU-friendly defaults and a hypothesis profile sized for 2 cores."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

# Tiny models are dominated by per-op overhead: one intra-op thread is faster than two and immune to a busy
# machine (measured: a tiny conv took 72 ms with 2 threads at load 9, 0.9 ms with 1).
torch.set_num_threads(1)

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    """Every test starts seeded on one thread; code under test that changes the thread count is undone afterwards."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
