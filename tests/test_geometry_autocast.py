"""Geometry keeps its float32 accuracy inside a bf16 autocast region (mixed-precision training loops).

Each operation is compared with a float64 evaluation of the same float32 inputs, within float32 round-off; without
the guard that switches autocast off inside the geometry (manifolds/numerics.py:upcast) each of them is 1e-3 to 1e-2
off. The inputs require grad: on CPU, autocast reaches the dot products of the autograd path (linalg.vecdot), while
the no-grad path builds them from elementwise kernels autocast leaves alone (a check there could not fail).
"""

from __future__ import annotations

import pytest
import torch

from manifold_fm.manifolds import Sphere, TokenSpheres

M = TokenSpheres(32, axis=1)
OPS = {
    "projx": lambda m, x, y, u, t: m.projx(3.0 * x),
    "proju": lambda m, x, y, u, t: m.proju(x, u + x),
    "expmap": lambda m, x, y, u, t: m.expmap(x, u),
    "logmap": lambda m, x, y, u, t: m.logmap(x, y),
    "dist": lambda m, x, y, u, t: m.dist(x, y),
    "geodesic x_t": lambda m, x, y, u, t: m.geodesic(x, y, t)[0],
    "geodesic u_t": lambda m, x, y, u, t: m.geodesic(x, y, t)[1],
}


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x, y = M.random_base((8, 32, 4, 4), generator=g), M.random_base((8, 32, 4, 4), generator=g)
    u = M.proju(x, torch.randn(8, 32, 4, 4, generator=g))
    return x, y, u, torch.rand(8, generator=g)


@pytest.mark.parametrize("op", list(OPS))
def test_sphere_ops_keep_float32_accuracy_under_bf16_autocast(op: str) -> None:
    x, y, u, t = _inputs()
    ref = OPS[op](M, x.double(), y.double(), u.double(), t.double())
    grads = [a.clone().requires_grad_(True) for a in (x, y, u)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = OPS[op](M, *grads, t)
    assert out.dtype == torch.float32
    scale = float(ref.abs().max())
    assert float((out.detach().double() - ref).abs().max()) < 1e-5 * scale  # measured ~3e-7; bf16 is 1e-3..1e-2
    # The gradient too: backward runs the float32 graph the forward recorded (autocast was off inside the op).
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(weights.float())
    ref_inputs = [a.double().requires_grad_(True) for a in (x, y, u)]
    (OPS[op](M, *ref_inputs, t.double()) * weights).sum().backward()
    for got, want in zip(grads, ref_inputs, strict=True):
        assert (got.grad is None) == (want.grad is None), op  # an input the op does not use has no gradient
        if want.grad is not None:
            assert float((got.grad.double() - want.grad).abs().max()) < 1e-4 * float(want.grad.abs().max()), op


def test_autocast_is_restored_after_the_call():
    m = Sphere(1.0)
    x = m.random_base((4, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.expmap(x, m.proju(x, torch.randn(4, 3)))
        assert torch.is_autocast_enabled("cpu")
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.bfloat16
