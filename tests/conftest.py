"""Shared test setup: deterministic, CPU-friendly defaults, hypothesis profiles, and shared fixtures.

Hypothesis profiles (choose with the ``HYPOTHESIS_PROFILE`` environment variable):

* ``ci`` (the default): derandomized, so every run tries the same examples; 40 examples per property (tests that
  set a smaller budget through ``helpers.max_examples`` keep it); sized for a shared 2-core machine.
* ``dev``: randomised, 1000 examples per property (25x the ``ci`` budget, ``helpers.max_examples`` budgets scale by
  the same factor), failures printed with a reproduction blob and kept in the ``.hypothesis/`` example database.
  For hunting bugs before a release, e.g.
  ``HYPOTHESIS_PROFILE=dev python -m pytest tests/test_manifold_contract.py tests/test_paths.py``.

Both have no deadline (a shared machine's timings are noise) and the same health-check suppressions.

Shared helpers that are not fixtures are in ``helpers.py`` (this file puts ``tests/`` on ``sys.path``, whatever
pytest's import mode).

Devices: the suite runs on the CPU on any machine, one with a GPU included (``python -m pytest`` there is supported):
every test sees no CUDA in-process (``helpers.cpu_only``) and every process a test starts gets CUDA hidden
(``helpers.cpu_env``), so bitwise and cross-process comparisons run on the CPU kernels they were written for. Tests
marked ``gpu`` run on the real GPU instead and are skipped, with the reason, where there is none.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from manifold_fm.manifolds.geoopt_adapter import import_geoopt  # noqa: E402
from manifold_fm.manifolds.numerics import load_forward_ad  # noqa: E402

from helpers import CI_MAX_EXAMPLES, cpu_only, standin_extractor  # noqa: E402

# Test modules `import geoopt` and call torch.func themselves; the first import of geoopt and first use of forward AD
# go through the package's, which keep torch's FutureWarning (torch.jit.script) from users: no filter needed for it.
import_geoopt()
load_forward_ad()

# Tiny models are dominated by per-op overhead: one intra-op thread is faster than two and immune to a busy
# machine (measured: a tiny conv took 72 ms with 2 threads at load 9, 0.9 ms with 1).
torch.set_num_threads(1)

_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "ci",
    max_examples=CI_MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=_SUPPRESSED,
    derandomize=True,
)
settings.register_profile(
    "dev",
    max_examples=25 * CI_MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=_SUPPRESSED,
    derandomize=False,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_HAS_GPU = torch.cuda.is_available()  # read once, before any test hides CUDA


@pytest.fixture(autouse=True)
def _devices(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test on the CPU (see the module docstring), except those marked ``gpu``: on the GPU, or skipped."""
    if request.node.get_closest_marker("gpu") is None:
        with cpu_only():
            yield
        return
    if not _HAS_GPU:
        pytest.skip("needs a CUDA GPU; none is visible to torch here")
    from helpers import reset_accelerate

    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    """Every test starts seeded on one thread; code under test that changes the thread count is undone afterwards."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture
def register_standin() -> Iterator[Callable[..., type]]:
    """Registers stand-ins for Inception with torch-fidelity for the duration of one test.

    ``register_standin(name, **kwargs) -> class``: builds ``helpers.standin_extractor(**kwargs)``, registers it
    under ``name`` (selectable as ``feature_extractor=name`` / ``--feature-extractor name``) and returns the class;
    every name registered is removed from torch-fidelity's registry when the test ends.
    """
    registered: list[str] = []

    def register(name: str, **kwargs: Any) -> type:
        from torch_fidelity.registry import register_feature_extractor

        cls = standin_extractor(**kwargs)
        register_feature_extractor(name, cls)
        registered.append(name)
        return cls

    yield register
    if registered:
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        for name in registered:
            FEATURE_EXTRACTORS_REGISTRY.pop(name, None)
