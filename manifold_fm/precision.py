"""The numerical precision of sampling and evaluation: one setting (``sample.precision``, ``manifold-fm sample
--precision``, ``manifold-fm evaluate --precision``), applied in one place (:func:`precision_scope`).

- ``fp32``: IEEE float32 everywhere; TF32 tensor-core matmuls and convolutions are switched *off* (the reference).
- ``tf32``: float32 tensors; on NVIDIA GPUs since Ampere, matmuls and convolutions run on TF32 tensor cores (inputs
  rounded to a 10-bit mantissa, float32 accumulation). On the CPU it is the same as ``fp32`` (there is no TF32).
- ``bf16``: the network and the decoder run under ``torch.autocast(bfloat16)`` (matmuls and convolutions in bfloat16
  with float32 accumulation, TF32 for what autocast keeps in float32), on GPUs and CPUs alike (on a CPU without
  bfloat16 units it is slower than float32). The geometry switches autocast off and computes in float32
  (:mod:`manifold_fm.manifolds.numerics`), so exp-map steps, projections and the samples' distance from the spheres
  keep float32 accuracy.
- ``auto`` (the default): :data:`AUTO_ON_CUDA` on CUDA devices, ``fp32`` elsewhere. The choice for GPUs comes from
  ``python benchmarks/sampling.py precision`` (``benchmarks/results/sampling_precision.md``): bf16 is chosen when the
  change of the built-in proxy's FD from fp32 to bf16 is within the spread of FD over seeds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

Precision = Literal["auto", "bf16", "tf32", "fp32"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "tf32", "fp32")
#: What ``auto`` means on CUDA devices (see the module docstring for the rule that chose it).
AUTO_ON_CUDA = "bf16"


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``bf16``, ``tf32`` or ``fp32``: ``precision`` itself, or what ``auto`` means on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return AUTO_ON_CUDA if torch.device(device).type == "cuda" else "fp32"


@contextlib.contextmanager
def precision_scope(precision: str, device: torch.device | str) -> Iterator[str]:
    """Run the block in ``precision`` on ``device`` (see the module docstring): sampling (the network, the decoder) or
    an evaluation's feature network. Yields the resolved setting. The TF32 switches are process-wide and restored on
    exit."""
    resolved = resolve_precision(precision, device)
    device = torch.device(device)
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    tf32 = resolved != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        # fp32 / tf32 also switch off an enclosing autocast: the setting is what runs
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolved == "bf16"):
            yield resolved
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


__all__ = ["AUTO_ON_CUDA", "PRECISIONS", "Precision", "resolve_precision", "precision_scope"]
