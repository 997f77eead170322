"""Helpers shared by several test modules (``from helpers import ...``: ``conftest.py`` puts ``tests/`` on
``sys.path``). Fixtures built on them live in ``conftest.py``.

The module is deliberately not ``tests/__init__.py``-based: torch-fidelity installs a top-level ``tests`` package.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from hypothesis import settings
from torch import Tensor

# ----------------------------------------------------------------------------------------------- hypothesis
CI_MAX_EXAMPLES = 40  # max_examples of the deterministic ``ci`` profile (conftest.py)


def max_examples(ci: int) -> int:
    """An example budget of ``ci`` under the ``ci`` profile, scaled with the loaded profile's budget otherwise.

    For ``@settings(max_examples=...)`` on tests that run fewer examples than the profile's default (many
    parametrized cases): under ``HYPOTHESIS_PROFILE=dev`` they then run proportionally more, instead of staying at
    their CI budget. Read when the test module is imported, i.e. after conftest loaded the profile.
    """
    return max(1, round(ci * settings.default.max_examples / CI_MAX_EXAMPLES))


# ----------------------------------------------------------------------------------------------- manifolds
def product_diff(a: Tensor, b: Tensor) -> Tensor:
    """Coordinate difference ``a - b`` on the test suites' product manifold, laid out as sphere (3) | flat torus (2)
    | euclidean (2): only the torus coordinates wrap (to ``[-pi, pi)``)."""
    from manifold_fm.manifolds.torus import wrap_angle  # here: conftest imports this module, keep that import light

    d = a - b
    return torch.cat([d[..., :3], wrap_angle(d[..., 3:5]), d[..., 5:]], dim=-1)


def sphere_grid(n_theta: int) -> tuple[Tensor, Tensor]:
    """Midpoint quadrature on the unit sphere S^2 in float64: ``n_theta`` polar by ``2 n_theta`` azimuthal cells.

    Returns the cell centres ``(n_theta * 2 n_theta, 3)`` and their areas ``sin(theta) dtheta dphi``.
    """
    th = (torch.arange(n_theta, dtype=torch.float64) + 0.5) * math.pi / n_theta
    ph = (torch.arange(2 * n_theta, dtype=torch.float64) + 0.5) * math.pi / n_theta
    T, P = torch.meshgrid(th, ph, indexing="ij")
    x = torch.stack([torch.sin(T) * torch.cos(P), torch.sin(T) * torch.sin(P), torch.cos(T)], -1).reshape(-1, 3)
    return x, (torch.sin(T) * (math.pi / n_theta) ** 2).reshape(-1)


# ----------------------------------------------------------------------------------------------- optional extras
#: The first diffusers release with ``AutoencoderKLFlux2`` (checked in the wheels of 0.35.2 and 0.36.0).
FLUX2_MIN_DIFFUSERS = "0.36.0"


def require_flux2_vae() -> type:
    """diffusers' ``AutoencoderKLFlux2``, or skip the calling test with the reason: diffusers is not installed (the
    optional ``images`` extra) or older than :data:`FLUX2_MIN_DIFFUSERS`."""
    import pytest

    diffusers = pytest.importorskip("diffusers", reason="FLUX.2's VAE needs diffusers (the optional 'images' extra)")
    cls = getattr(diffusers, "AutoencoderKLFlux2", None)
    if cls is None:
        pytest.skip(
            f"diffusers {diffusers.__version__} has no AutoencoderKLFlux2 (first in diffusers {FLUX2_MIN_DIFFUSERS})"
        )
    return cls


# ----------------------------------------------------------------------------------------------- torch-fidelity
def standin_extractor(
    *,
    pool: int,
    features: int | None = None,
    logits: int | Sequence[Sequence[float]] | Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> type:
    """A torch-fidelity feature-extractor class standing in for Inception, whose weights are not available here.

    Feature ``"pool"`` (the FD layer): the uint8 images in ``dtype``, divided by 255, average-pooled to
    ``pool x pool`` per channel and flattened; then, when ``features`` is given, times a fixed random
    ``(3 pool^2, features)`` projection drawn from ``torch.Generator().manual_seed(0)``.
    Feature ``"logits"`` (the Inception-score layer), only when ``logits`` is given: the pool features in float32
    times a head that is either random ``(features, logits)``, drawn next from the same generator, or the given
    matrix. Without logits, every metric (the Inception score too) reads ``"pool"``.

    torch-fidelity is imported here, so test modules that use this still collect without the ``images`` extra.
    """
    import torch.nn.functional as F
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    g = torch.Generator().manual_seed(0)
    proj = None if features is None else torch.randn(3 * pool * pool, features, generator=g)
    if logits is None:
        head = None
    elif isinstance(logits, int):
        if features is None:
            raise ValueError("a random logits head needs a random projection: give features too")
        head = torch.randn(features, logits, generator=g)
    else:
        head = torch.as_tensor(logits, dtype=torch.float32)
    provided = ("pool",) if head is None else ("pool", "logits")

    class StandIn(FeatureExtractorBase):
        def __init__(self, name: str, features_list: list[str], **kwargs: Any) -> None:
            super().__init__(name, features_list)
            self.register_buffer("proj", None if proj is None else proj.clone())
            self.register_buffer("head", None if head is None else head.clone())

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return provided

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return "logits" if metric == "isc" and "logits" in provided else "pool"

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> Tensor:
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

        def forward(self, x: Tensor) -> tuple[Tensor, ...]:
            f = F.adaptive_avg_pool2d(x.to(dtype) / 255, pool).flatten(1)
            if self.proj is not None:
                f = f @ self.proj.to(dtype)
            out = {"pool": f}
            if self.head is not None:
                out["logits"] = f.float() @ self.head
            return tuple(out[k] for k in self.features_list)

    return StandIn


# ----------------------------------------------------------------------------------------------- CLI runs
def tiny_image_run(*settings: str) -> list[str]:
    """``manifold-fm train`` options of a seconds-long ``image-builtin`` run (2 images per class, batch 8, no sample
    grids during training) followed by ``--set`` for each of ``settings``."""
    base = ["data.per_class=2", "train.batch_size=8", "train.sample_every=null", *settings]
    return ["--config", "image-builtin", *(arg for s in base for arg in ("--set", s))]


# ----------------------------------------------------------------------------------------------- processes, CPU
# The suite runs on the CPU on every machine, a GPU machine included: results compared bit for bit or across
# processes must come from the same kernels, and two gloo ranks must not become two NCCL ranks on one GPU. Launched
# processes get an environment that hides CUDA (cpu_env: every subprocess call in tests/ passes env=cpu_env(...),
# test_gpu_machine.py checks it); in-process code sees no CUDA through cpu_only() (conftest.py applies it to every
# test not marked ``gpu``).


def cpu_env(*, drop: Sequence[str] = (), **extra: str) -> dict[str, str]:
    """The environment of a process a test starts: this one's with CUDA hidden (``CUDA_VISIBLE_DEVICES=""``) and one
    OpenMP thread, plus ``extra``, without the variables in ``drop``."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **extra}


def free_port() -> int:
    """A TCP port free on this machine now (for a launcher's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(*args: str, processes: int = 2) -> list[str]:
    """``accelerate launch`` of ``processes`` CPU processes (gloo ranks) running ``args`` (``-m module ...`` or a
    script path and its arguments); run it with ``env=cpu_env()``."""
    import sys

    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *(["--multi_gpu"] if processes > 1 else ["--cpu"]),
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *args,
    ]


@contextlib.contextmanager
def cpu_only() -> Iterator[None]:
    """In-process code sees no CUDA (``torch.cuda.is_available()`` is false), so the library, accelerate and
    torch-fidelity choose the CPU as on a machine without a GPU; accelerate's process state is rebuilt on entry and
    on exit, so no device choice leaks into or out of the block."""
    from unittest import mock

    reset_accelerate()
    try:
        with mock.patch("torch.cuda.is_available", _no_cuda), mock.patch("torch.cuda.device_count", _no_devices):
            yield
    finally:
        reset_accelerate()


def _no_cuda() -> bool:
    return False


def _no_devices() -> int:
    return 0


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state (its device is chosen once per state); a no-op before any."""
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state and not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)
