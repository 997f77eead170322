"""TokenSpheres against a plain Python loop over tokens applying :class:`Sphere` to each token vector."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from manifold_fm.manifolds import ManifoldError, Sphere, TokenSpheres


def tokens(x: Tensor, axis: int) -> Tensor:
    """``(B, C, H, W)`` with axis 1 or ``(B, N, D)`` with axis -1 -> ``(B, T, C)``: one row per token."""
    return x.movedim(axis, -1).reshape(x.shape[0], -1, x.shape[axis])


LAYOUTS = [
    pytest.param((3, 6, 4, 2), 1, id="BCHW_axis1"),
    pytest.param((3, 5, 6), -1, id="BND_axis-1"),
]


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("radius", [None, 0.7], ids=["R=sqrt(dim)", "R=0.7"])
def test_matches_loop_over_tokens(shape: tuple[int, ...], axis: int, dtype: torch.dtype, radius: float | None) -> None:
    dim = shape[axis]
    m = TokenSpheres(dim, axis=axis, radius=radius)
    R = math.sqrt(dim) if radius is None else radius
    assert m.radius == pytest.approx(R)
    s = Sphere(R)
    g = torch.Generator().manual_seed(0)
    x = m.random_base(shape, generator=g, dtype=dtype)
    y = m.random_base(shape, generator=g, dtype=dtype)
    a = torch.randn(shape, generator=g, dtype=dtype)
    u = m.proju(x, a)
    t = torch.rand(shape[0], generator=g, dtype=dtype)
    x_t, u_t = m.geodesic(x, y, t)
    ours = {
        "projx": tokens(m.projx(a), axis),
        "proju": tokens(u, axis),
        "expmap": tokens(m.expmap(x, u), axis),
        "logmap": tokens(m.logmap(x, y), axis),
        "transp": tokens(m.transp(x, y, u), axis),
        "x_t": tokens(x_t, axis),
        "u_t": tokens(u_t, axis),
    }
    X, Y, A, U = (tokens(z, axis) for z in (x, y, a, u))
    atol = 1e-12 if dtype == torch.float64 else 1e-5 * max(R, 1.0)
    sq_dist = torch.zeros(shape[0], dtype=torch.float64)
    inner = torch.zeros(shape[0], dtype=torch.float64)
    for b in range(shape[0]):
        for k in range(X.shape[1]):
            xv, yv, av, uv = X[b, k], Y[b, k], A[b, k], U[b, k]
            xt, ut = s.geodesic(xv, yv, float(t[b]))
            expected = {
                "projx": s.projx(av),
                "proju": s.proju(xv, av),
                "expmap": s.expmap(xv, uv),
                "logmap": s.logmap(xv, yv),
                "transp": s.transp(xv, yv, uv),
                "x_t": xt,
                "u_t": ut,
            }
            for name, ref in expected.items():
                err = float((ours[name][b, k] - ref).abs().max())
                assert err <= atol, f"{name} token ({b}, {k}): error {err:.3g}"
            sq_dist[b] += float(s.dist(xv, yv)) ** 2
            inner[b] += float(s.inner(xv, uv, uv))
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(m.dist(x, y).double(), sq_dist.sqrt(), rtol=rtol)
    assert torch.allclose(m.inner(x, u, u).double(), inner, rtol=rtol)
    assert m.dist(x, y).shape == (shape[0],)
    # per-token angles keep a size-1 channel axis
    assert m.angle(x, y).shape[axis] == 1


def test_wrong_channel_count_is_a_clear_error() -> None:
    m = TokenSpheres(8, axis=1)
    with pytest.raises(ManifoldError, match="dim=8"):
        m.projx(torch.randn(2, 4, 3, 3))
    with pytest.raises(ManifoldError, match="token axis"):
        m.projx(torch.randn(8))
    with pytest.raises(ValueError, match="dim must be an integer"):
        TokenSpheres(1)


def test_check_point_on_latent_batch() -> None:
    m = TokenSpheres(4, axis=1)
    x = m.random_base((2, 4, 3, 3))
    m.check_point(x)
    with pytest.raises(ManifoldError, match="off the manifold"):
        m.check_point(x * 1.1)
    with pytest.raises(ManifoldError, match="not tangent"):
        m.check_vector(x, x)


def test_compile_option_routes_geodesic_through_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile=True`` hands the geodesic to torch.compile once and uses the result (identity stand-in here:
    compiling for real takes minutes on the 2-core CI machine; benchmarks/bench_geometry.py --compile runs it)."""
    calls: list[object] = []

    def fake_compile(fn: object, **kwargs: object) -> object:
        calls.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    eager, compiled = TokenSpheres(4, axis=1), TokenSpheres(4, axis=1, compile=True)
    x0 = eager.random_base((3, 4, 2, 2), dtype=torch.float64)
    x1 = eager.random_base((3, 4, 2, 2), dtype=torch.float64)
    x1[:, :, 0, 0] = -x0[:, :, 0, 0]  # antipodal tokens take the policy branch
    t = torch.tensor([0.0, 0.3, 0.8], dtype=torch.float64)
    for _ in range(2):
        for a, b in zip(eager.geodesic(x0, x1, t), compiled.geodesic(x0, x1, t), strict=True):
            assert torch.equal(a, b)
    assert len(calls) == 1
    assert not eager.compile and compiled.compile


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_buffer_reusing_path_equals_autograd_path_and_leaves_inputs(shape: tuple[int, ...], axis: int) -> None:
    """Without autograd, geodesic/expmap/logmap build their results in reused scratch tensors; they must agree with
    the autograd-safe path bit for bit in float64 and never write into their inputs."""
    m = TokenSpheres(shape[axis], axis=axis)
    g = torch.Generator().manual_seed(1)
    x0 = m.random_base(shape, generator=g, dtype=torch.float64)
    x1 = m.random_base(shape, generator=g, dtype=torch.float64)
    x1.select(axis, 0).zero_()
    x1 = m.projx(x1)
    x1[0] = -x0[0]  # a fully antipodal sample takes the policy branch
    u = m.proju(x0, torch.randn(shape, generator=g, dtype=torch.float64))
    t = torch.rand(shape[0], generator=g, dtype=torch.float64)
    originals = [a.clone() for a in (x0, x1, u, t)]
    plain = {
        "geodesic": m.geodesic(x0, x1, t),
        "expmap": (m.expmap(x0, u),),
        "logmap": (m.logmap(x0, x1),),
    }
    for a, b in zip((x0, x1, u, t), originals, strict=True):
        assert torch.equal(a, b), "an input was modified in place"
    xg, yg, ug = (a.clone().requires_grad_(True) for a in (x0, x1, u))
    tracked = {"geodesic": m.geodesic(xg, yg, t), "expmap": (m.expmap(xg, ug),), "logmap": (m.logmap(xg, yg),)}
    for name in plain:
        for a, b in zip(plain[name], tracked[name], strict=True):
            assert torch.allclose(a, b.detach(), atol=1e-14, rtol=0), name


def test_mixed_dtypes_and_broadcast_batches_promote_like_torch() -> None:
    """Inputs of different dtypes or broadcastable shapes take the out-of-place path and promote as torch does."""
    m = Sphere(1.0)
    a = m.random_base((5, 3), dtype=torch.float32)
    b = m.random_base((1, 3), dtype=torch.float64)
    assert m.logmap(a, b).dtype == torch.float64 and m.logmap(a, b).shape == (5, 3)
    assert m.dist(b, a).shape == (5,)
    x_t, u_t = m.geodesic(b, a, 0.25)
    assert x_t.shape == (5, 3) and x_t.dtype == torch.float64
    ref_x, ref_u = m.geodesic(b.expand(5, 3).clone(), a.double(), 0.25)
    assert torch.allclose(x_t, ref_x, atol=1e-12) and torch.allclose(u_t, ref_u, atol=1e-12)


def test_forward_mode_ad_through_sphere_ops_matches_finite_difference():
    """torch.func.jvp must take the differentiable path (the no-autograd fast path writes in place)."""
    m = TokenSpheres(8, axis=1)
    g = torch.Generator().manual_seed(3)
    x = m.random_base((2, 8, 3), generator=g, dtype=torch.float64)
    y = m.random_base((2, 8, 3), generator=g, dtype=torch.float64)
    dy = m.proju(y, torch.randn(2, 8, 3, generator=g, dtype=torch.float64))
    with torch.no_grad():
        _, jvp = torch.func.jvp(lambda yy: m.logmap(x, yy), (y,), (dy,))
    h = 1e-6
    fd = (m.logmap(x, y + h * dy) - m.logmap(x, y - h * dy)) / (2 * h)
    torch.testing.assert_close(jvp, fd, rtol=1e-6, atol=1e-7)


def test_the_sync_free_antipodal_blend_equals_the_host_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    """On accelerators the antipodal fallback is blended in without reading a flag on the host; forced here on the
    CPU, it gives the same values as the branch, with and without antipodal tokens in the batch."""
    import manifold_fm.manifolds.sphere as sphere_mod

    m = TokenSpheres(4, axis=1)
    g = torch.Generator().manual_seed(3)
    x0, x1 = m.random_base((3, 4, 2, 2), g), m.random_base((3, 4, 2, 2), g)
    anti = x1.clone()
    anti[:, :, 0, 0] = -x0[:, :, 0, 0]  # one antipodal token per sample
    t = torch.rand(3, generator=g)
    for b in (x1, anti):
        branched = (m.geodesic(x0, b, t), m.logmap(x0, b), m.dist(x0, b))
        monkeypatch.setattr(sphere_mod, "branch_on_host", lambda x: False)
        blended = (m.geodesic(x0, b, t), m.logmap(x0, b), m.dist(x0, b))
        monkeypatch.undo()
        for u, v in zip((*branched[0], *branched[1:]), (*blended[0], *blended[1:]), strict=True):
            assert torch.equal(u, v)
