"""Numerical helpers shared by the manifolds: dtype policy, time broadcasting, safe elementwise functions.

Pure tensor math; nothing here holds state.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)

F = TypeVar("F", bound=Callable[..., Any])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a computation on ``dtype`` inputs runs in: float32 for float16/bfloat16, else ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def _cast_out(out: Any, dtype: torch.dtype) -> Any:
    if isinstance(out, Tensor):
        return out.to(dtype) if out.is_floating_point() else out
    if isinstance(out, tuple):
        return tuple(_cast_out(o, dtype) for o in out)
    return out


def upcast(fn: F) -> F:
    """Run ``fn`` in float32 when its first tensor argument is float16/bfloat16; cast tensor results back.

    The convention (DESIGN.md): low-precision inputs are computed internally in float32 and returned in the input's
    dtype. Other floating tensor arguments are promoted to the same compute dtype. An enclosing ``torch.autocast``
    region is switched off for the duration of the call.
    """

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        first = next((a for a in args if isinstance(a, Tensor) and a.is_floating_point()), None)
        if first is not None and torch.is_autocast_enabled(first.device.type):
            # Under autocast (bf16 mixed-precision training) matmul-like ops inside the geometry would silently run
            # in bf16 and put points ~1e-2 off the sphere; the geometry keeps its own dtype policy instead.
            with torch.autocast(first.device.type, enabled=False):
                return wrapper(self, *args, **kwargs)
        if first is None or first.dtype not in LOW_PRECISION:
            return fn(self, *args, **kwargs)
        in_dtype = first.dtype

        def up(a: Any) -> Any:
            return a.float() if isinstance(a, Tensor) and a.is_floating_point() else a

        out = fn(self, *(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})
        return _cast_out(out, in_dtype)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def jit_script_deprecation_silenced() -> Iterator[None]:
    """Hide the ``FutureWarning`` "torch.jit.script is deprecated" inside the block: recent torch raises it from
    code that is not ours and that no user of ours can change (geoopt's kernels on import, torch's own forward-AD
    decompositions on first use). Wraps only those one-time loads, never user code."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        yield


@functools.cache
def load_forward_ad() -> None:
    """Load torch's forward-AD decompositions (done on the first ``make_dual`` of a process) with
    :func:`jit_script_deprecation_silenced`; later calls do nothing."""
    import torch.autograd.forward_ad as fwAD

    with jit_script_deprecation_silenced(), fwAD.dual_level():
        fwAD.make_dual(torch.zeros(()), torch.zeros(()))


def branch_on_host(x: Tensor) -> bool:
    """Whether code on ``x`` may read a flag on the host to skip work (a fallback no element needs, iterations after
    convergence). On the CPU that read is free and the work is not; on an accelerator the read would stall the stream
    on every call (a training step), so the work is done there, arranged to give the same values."""
    return x.device.type == "cpu"


def broadcast_time(t: float | Tensor, x: Tensor) -> Tensor:
    """Shape ``t`` to broadcast against ``x``.

    ``t`` may be a Python number, a 0-d tensor, a per-sample vector of shape ``(B,)`` with ``B == x.shape[0]``
    (broadcast over every other axis of ``x``: all tokens of a sample share its time), or a tensor already
    broadcastable to ``x`` with ``x.ndim`` dimensions.
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dtype != x.dtype:
        t = t.to(x.dtype)
    if t.ndim == 0 or t.ndim == x.ndim:
        return t
    if t.ndim == 1 and x.ndim >= 1 and t.shape[0] == x.shape[0]:
        return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))
    raise ValueError(
        f"time of shape {tuple(t.shape)} does not fit points of shape {tuple(x.shape)}: pass a scalar, a (B,) vector "
        f"with B = {x.shape[0] if x.ndim else 1}, or a tensor with {x.ndim} dimensions"
    )


def safe_sqrt(s: Tensor) -> Tensor:
    """``sqrt(max(s, 0))`` whose gradient is 0 (not inf/NaN) where ``s <= tiny``."""
    positive = s > torch.finfo(s.dtype).tiny
    # Scalar fill values in where(): no ones_like/zeros_like or bool->float copies (these run per token, per call).
    return torch.where(positive, torch.where(positive, s, 1.0).sqrt(), 0.0)


def sinc(x: Tensor) -> Tensor:
    """Unnormalised ``sin(x) / x`` with value 1 and finite gradients at 0.

    ``sin(x)/x`` is accurate to rounding for any ``x != 0`` (both are relative-accurate); below ``|x| = 1e-2`` the
    Taylor polynomial ``1 - x^2/6 (1 - x^2/20)`` (error < x^6/5040 < 3e-16) keeps autograd's
    ``cos(x)/x - sin(x)/x^2`` from overflowing. ~4x cheaper than ``torch.sinc`` on CPU.
    """
    small = x.abs() < 1e-2
    xs = torch.where(small, 1.0, x)
    x2 = x * x
    return torch.where(small, 1.0 - x2 / 6.0 * (1.0 - x2 / 20.0), torch.sin(xs) / xs)


def angle_over_sine(w: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """``w / y`` for ``w = atan2(y, x)`` and ``y >= 0``, finite as ``y -> 0`` (its limit ``1/x`` for ``x > 0``).

    For ``y -> 0`` with ``x <= 0`` the true value diverges; the caller handles that case (an antipodal policy), and
    this returns the finite stand-in ``pi / tiny`` there so no Inf appears. Taking the already computed angle ``w``
    saves a second ``atan2``.
    """
    tiny = torch.finfo(y.dtype).tiny
    small = y <= tiny
    ratio = w / torch.where(small, 1.0, y)
    # y -> 0, x > 0: atan2(y, x)/y -> 1/x (x > 0 on this branch, bounded away from 0 by |x| = radius).
    acute = x > 0
    limit = torch.where(acute, 1.0 / torch.where(acute, x, 1.0), math.pi / tiny)
    return torch.where(small, limit, ratio)


def dlog_series(w: Tensor) -> Tensor:
    """``(sin w - w cos w) / sin^3 w`` (the sphere's ``d log`` coefficient); below a threshold where the direct form
    cancels, its Taylor series ``1/3 + 2 w^2/15 + 2 w^4/63 + 4 w^6/675`` (threshold 0.02 in float64, 0.2 in float32:
    truncation error below ~1e-13 / 1e-8 relative)."""
    cut = 0.02 if w.dtype == torch.float64 else 0.2
    w2 = w * w
    series = 1.0 / 3.0 + w2 * (2.0 / 15.0 + w2 * (2.0 / 63.0 + w2 * (4.0 / 675.0)))
    small = w < cut
    ws = torch.where(small, torch.ones_like(w), w)
    direct = (torch.sin(ws) - ws * torch.cos(ws)) / torch.sin(ws) ** 3
    return torch.where(small, series, direct)
