"""Probability paths against closed forms (float64), finite differences and per-token loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from manifold_fm.manifolds import Euclidean, FlatTorus, Sphere, TokenSpheres
from manifold_fm.paths import GeodesicPath, LinearPath, PathSample, PolarPath, build_path

D64 = torch.float64


def slerp_reference(x0: torch.Tensor, x1: torch.Tensor, t: float, R: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The SFM formulas with sin(w) in the denominator (fine away from w = 0, pi)."""
    w = torch.acos(((x0 * x1).sum(-1, keepdim=True) / R**2).clamp(-1, 1))
    xt = (torch.sin((1 - t) * w) * x0 + torch.sin(t * w) * x1) / torch.sin(w)
    ut = w * (torch.cos(t * w) * x1 - torch.cos((1 - t) * w) * x0) / torch.sin(w)
    return xt, ut


def fd_velocity(path, x0, x1, t: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    return (path.sample(x0, x1, t + h).x_t - path.sample(x0, x1, t - h).x_t) / (2 * h)


@pytest.mark.parametrize("R", [1.0, 2.5])
def test_geodesic_path_on_sphere_matches_sfm_formulas(R: float) -> None:
    m = Sphere(R)
    g = torch.Generator().manual_seed(1)
    x0, x1 = m.random_base((64, 5), g, dtype=D64), m.random_base((64, 5), g, dtype=D64)
    path = GeodesicPath(m)
    for tv in (0.0, 0.3, 0.77, 1.0):
        s = path.sample(x0, x1, torch.full((64,), tv, dtype=D64))
        ref_x, ref_u = slerp_reference(x0, x1, tv, R)
        torch.testing.assert_close(s.x_t, ref_x, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(s.u_t, ref_u, atol=1e-10, rtol=1e-10)
        # constant speed R * angle, tangent at x_t
        torch.testing.assert_close(s.u_t.norm(dim=-1), m.dist(x0, x1), atol=1e-10, rtol=1e-10)
        assert float((s.u_t * s.x_t).sum(-1).abs().max()) < 1e-10
    assert isinstance(s, PathSample) and s.t.shape == (64,)


def test_geodesic_velocity_is_time_derivative_on_token_spheres_bchw() -> None:
    m = TokenSpheres(4, axis=1)
    g = torch.Generator().manual_seed(2)
    x0, x1 = m.random_base((3, 4, 5, 6), g, dtype=D64), m.random_base((3, 4, 5, 6), g, dtype=D64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=D64)
    path = GeodesicPath(m)
    torch.testing.assert_close(path.sample(x0, x1, t).u_t, fd_velocity(path, x0, x1, t), atol=1e-6, rtol=1e-6)


def test_token_layouts_equal_a_per_token_loop() -> None:
    """(B, C, H, W) with axis=1 and (B, N, D) with axis=-1 equal Sphere on every token vector, each with its t_b."""
    g = torch.Generator().manual_seed(3)
    R = 2.0
    x0 = TokenSpheres(4, axis=1).projx(torch.randn(2, 4, 3, 3, generator=g, dtype=D64))
    x1 = TokenSpheres(4, axis=1).projx(torch.randn(2, 4, 3, 3, generator=g, dtype=D64))
    t = torch.tensor([0.25, 0.8], dtype=D64)
    s = GeodesicPath(TokenSpheres(4, axis=1)).sample(x0, x1, t)
    sph = Sphere(R)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                xt, ut = sph.geodesic(x0[b, :, i, j], x1[b, :, i, j], float(t[b]))
                torch.testing.assert_close(s.x_t[b, :, i, j], xt)
                torch.testing.assert_close(s.u_t[b, :, i, j], ut)
    seq0, seq1 = x0.flatten(2).transpose(1, 2), x1.flatten(2).transpose(1, 2)  # (B, N, D)
    s2 = GeodesicPath(TokenSpheres(4, axis=-1)).sample(seq0, seq1, t)
    torch.testing.assert_close(s2.x_t, s.x_t.flatten(2).transpose(1, 2))


def test_linear_path_closed_form_and_manifold() -> None:
    g = torch.Generator().manual_seed(4)
    x0, x1 = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    t = torch.rand(5, generator=g)
    s = LinearPath().sample(x0, x1, t)
    tt = t.view(5, 1, 1, 1)
    torch.testing.assert_close(s.x_t, (1 - tt) * x0 + tt * x1)
    torch.testing.assert_close(s.u_t, x1 - x0)
    assert isinstance(LinearPath().manifold, Euclidean)


def test_polar_path_radius_linear_direction_slerp() -> None:
    g = torch.Generator().manual_seed(5)
    x0, x1 = torch.randn(4, 6, 7, generator=g, dtype=D64), torch.randn(4, 6, 7, generator=g, dtype=D64) * 3
    t = torch.tensor([0.0, 0.2, 0.6, 1.0], dtype=D64)
    path = PolarPath(axis=-1)
    s = path.sample(x0, x1, t)
    r0, r1 = x0.norm(dim=-1), x1.norm(dim=-1)
    torch.testing.assert_close(s.x_t.norm(dim=-1), (1 - t[:, None]) * r0 + t[:, None] * r1)
    torch.testing.assert_close(s.x_t[0], x0[0])
    torch.testing.assert_close(s.x_t[3], x1[3])
    tm = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=D64)
    torch.testing.assert_close(path.sample(x0, x1, tm).u_t, fd_velocity(path, x0, x1, tm), atol=1e-6, rtol=1e-6)
    # direction is the unit-sphere slerp
    ref_x, _ = slerp_reference(x0 / r0[..., None], x1 / r1[..., None], 0.2, 1.0)
    torch.testing.assert_close(s.x_t[1] / s.x_t[1].norm(dim=-1, keepdim=True), ref_x[1])


def test_geodesic_path_on_torus_uses_shortest_wrap() -> None:
    m = FlatTorus()
    x0 = torch.tensor([[3.0, -3.0]], dtype=D64)
    x1 = torch.tensor([[-3.0, 3.0]], dtype=D64)
    s = GeodesicPath(m).sample(x0, x1, torch.tensor([0.5], dtype=D64))
    torch.testing.assert_close(s.u_t, torch.tensor([[2 * math.pi - 6.0, 6.0 - 2 * math.pi]], dtype=D64))
    torch.testing.assert_close(s.x_t.abs(), torch.full((1, 2), math.pi, dtype=D64))


@given(t=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_geodesic_path_stays_on_sphere_float32(t: float, seed: int) -> None:
    m = TokenSpheres(8, axis=-1)
    g = torch.Generator().manual_seed(seed)
    x0, x1 = m.random_base((4, 5, 8), g), m.random_base((4, 5, 8), g)
    s = GeodesicPath(m).sample(x0, x1, torch.full((4,), t))
    assert float(m.point_error(s.x_t).max()) < 1e-5
    assert float(m.vector_error(s.x_t, s.u_t).max()) < 1e-4


def test_bad_inputs_raise_one_line_errors() -> None:
    m = Sphere()
    x = m.random_base((3, 3))
    with pytest.raises(ValueError, match="must match"):
        GeodesicPath(m).sample(x, x[:2], torch.zeros(3))
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        LinearPath().sample(x, x, torch.zeros(4))
    with pytest.raises(ValueError, match="unknown path"):
        build_path("straight", m)
    assert isinstance(build_path("polar", m), PolarPath)
