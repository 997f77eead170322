"""Geometry keeps its float32 accuracy inside a bf16 autocast region (mixed-precision training loops)."""

from __future__ import annotations

import torch

from manifold_fm.manifolds import Sphere, TokenSpheres


def _radius_error(manifold: Sphere, x: torch.Tensor) -> float:
    return float((x.double().norm(dim=manifold.axis) / manifold.radius - 1).abs().max())


def test_sphere_ops_ignore_autocast():
    m = TokenSpheres(32, axis=1)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 32, 4, 4, generator=g)
    x0, x1 = m.random_base((8, 32, 4, 4), generator=g), m.projx(z)
    u = m.proju(x0, torch.randn(8, 32, 4, 4, generator=g))
    t = torch.rand(8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = m.projx(z)
        y = m.expmap(x0, u)
        xt, ut = m.geodesic(x0, x1, t)
    assert p.dtype == y.dtype == xt.dtype == torch.float32
    for pts in (p, y, xt):
        assert _radius_error(m, pts) < 1e-6
    ref_xt, ref_ut = m.geodesic(x0, x1, t)
    torch.testing.assert_close(xt, ref_xt, rtol=0, atol=0)
    torch.testing.assert_close(ut, ref_ut, rtol=0, atol=0)


def test_autocast_is_restored_after_the_call():
    m = Sphere(1.0)
    x = m.random_base((4, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.expmap(x, m.proju(x, torch.randn(4, 3)))
        assert torch.is_autocast_enabled("cpu")
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.bfloat16
