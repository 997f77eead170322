"""``manifold_fm.manifolds.testing``: the reusable contract checker passes on every built-in manifold and fails,
naming the broken property in one line, on deliberately broken ones; the angle-accuracy helpers are exact."""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from manifold_fm.manifolds import Manifold, Sphere, available_manifolds, build_manifold, testing
from manifold_fm.manifolds.testing import (
    angle_pairs,
    check_dist,
    check_geodesic_finite_difference,
    check_manifold,
    exact_angle,
)
from manifold_fm.manifolds.torus import wrap_angle

from helpers import product_diff

# name -> (constructor kwargs, batch shape, extra check_manifold kwargs per dtype)
BUILT_IN: dict[str, tuple[dict[str, Any], tuple[int, ...], Callable[[torch.dtype], dict[str, Any]]]] = {
    "euclidean": ({}, (6, 3, 2), lambda dt: {}),
    "sphere": ({"radius": 3.7}, (6, 3), lambda dt: {}),
    "token_spheres": ({"dim": 4, "axis": 1}, (6, 4, 3, 2), lambda dt: {}),
    "flat_torus": ({}, (6, 3), lambda dt: {"diff": lambda a, b: wrap_angle(a - b)}),
    "product": (
        {
            "factors": [
                {"name": "sphere", "shape": 3},
                {"name": "flat_torus", "shape": 2},
                {"name": "euclidean", "shape": 2},
            ]
        },
        (6, 7),
        lambda dt: {"diff": product_diff},  # its layout: sphere (3) | flat torus (2) | euclidean (2)
    ),
    "poincare_ball": ({}, (6, 3), lambda dt: {}),
    # geoopt's Lorentz distance is an arcosh (ill-conditioned near 0): the contract suite's looser tolerances.
    "lorentz": ({}, (6, 4), lambda dt: {"atol": 3.0 * (2e-8 if dt == torch.float64 else 2e-3)}),
    "spd": ({}, (6, 3, 3), lambda dt: {}),
}


def test_every_registered_manifold_has_a_case() -> None:
    assert set(BUILT_IN) == set(available_manifolds())


@pytest.mark.parametrize("name", list(BUILT_IN))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_checker_passes_on_built_in_manifolds(name: str, dtype: torch.dtype) -> None:
    kwargs, shape, extra = BUILT_IN[name]
    m = build_manifold(name, **kwargs)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x0, x1 = m.random_base(shape, generator=g, dtype=dtype), m.random_base(shape, generator=g, dtype=dtype)
        check_manifold(m, x0, x1, seed=seed, **extra(dtype))


# ----------------------------------------------------------------------------------------- broken manifolds
class ScaledLog(Sphere):
    """logmap 1% too long: exp(log) overshoots."""

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        return 1.01 * super().logmap(x, y)


class UnprojectedProju(Sphere):
    """proju forgets to remove the normal part."""

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        return u


class OffProjx(Sphere):
    """projx lands 0.1% outside the sphere."""

    def projx(self, x: Tensor) -> Tensor:
        return 1.001 * super().projx(x)


class BulgingSpeed(Sphere):
    """u_t correct at both ends but up to 0.25% too fast in between."""

    def geodesic(self, x0: Tensor, x1: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        x_t, u_t = super().geodesic(x0, x1, t)
        tt = torch.as_tensor(t, dtype=u_t.dtype).reshape(-1, *([1] * (u_t.ndim - 1)))
        return x_t, u_t * (1 + 0.01 * tt * (1 - tt))


class Reparametrised(Sphere):
    """x_t runs along the great circle at a non-constant rate s(t); u_t is the constant-speed velocity at x_t
    (tangent, |u_t| right), not the path's derivative ds/dt u."""

    def geodesic(self, x0: Tensor, x1: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        tt = torch.as_tensor(t, dtype=x0.dtype)
        return super().geodesic(x0, x1, tt + 0.05 * torch.sin(math.pi * tt))


class ProjectingTransp(Sphere):
    """transp is the base class's projection, which shortens vectors."""

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return self.proju(y, v)


class ScaledVelocity(Sphere):
    """u_t 1% too fast everywhere."""

    def geodesic(self, x0: Tensor, x1: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        x_t, u_t = super().geodesic(x0, x1, t)
        return x_t, 1.01 * u_t


class ScaledDist(Sphere):
    """dist 1% too long (logmap correct)."""

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        return 1.01 * super().dist(x, y)


class SkewLog(Sphere):
    """logmap (and with it dist = |logmap|) 1% longer where the base point's first coordinate is large."""

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        return super().logmap(x, y) * (1 + 0.01 * x[..., :1])

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        return self.norm(x, self.logmap(x, y))


def _pair(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Valid points of the unit sphere in R^5, drawn by the intact ``Sphere`` (a broken projx must not matter)."""
    g, m = torch.Generator().manual_seed(0), Sphere()
    return m.random_base((8, 5), generator=g, dtype=dtype), m.random_base((8, 5), generator=g, dtype=dtype)


BROKEN = [
    (OffProjx(), r"^projx lands on the manifold: .*off the manifold"),
    (UnprojectedProju(), r"^proju tangent: .*not tangent"),
    (ScaledLog(), r"^exp\(log\) = id: "),
    (ScaledDist(), r"^dist == norm\(log\): "),
    (ScaledVelocity(), r"^geodesic endpoints: u_0 vs logmap"),
    (BulgingSpeed(), r"^u_t constant speed: .* at t=0\.3"),
    (Reparametrised(), r"^u_t == log\(x_t, x1\)/\(1-t\): mismatch at t=0\.3"),
    (ProjectingTransp(), r"^transp isometry: "),
]


@pytest.mark.parametrize(("broken", "message"), [pytest.param(*b, id=type(b[0]).__name__) for b in BROKEN])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_checker_names_the_broken_property(broken: Manifold, message: str, dtype: torch.dtype) -> None:
    x0, x1 = _pair(dtype)
    with pytest.raises(AssertionError, match=message) as info:
        check_manifold(broken, x0, x1)
    assert "\n" not in str(info.value)
    # The same points pass on the intact sphere, so the failure is the defect's, not the data's.
    check_manifold(Sphere(), x0, x1)


def test_transp_check_can_be_skipped() -> None:
    x0, x1 = _pair()
    check_manifold(ProjectingTransp(), x0, x1, transp=False)


def test_single_checks_catch_what_check_manifold_reaches_later() -> None:
    m = ScaledVelocity()
    x0, x1 = _pair()
    with pytest.raises(AssertionError, match="central finite difference of x_t at t=0.5"):
        check_geodesic_finite_difference(m, x0, x1, 0.5, atol=1e-5)
    check_geodesic_finite_difference(Sphere(), x0, x1, 0.5, atol=1e-5)
    with pytest.raises(ValueError, match="needs h <= t"):
        check_geodesic_finite_difference(Sphere(), x0, x1, 1.0, atol=1e-5)
    # Asymmetric distance with dist == norm(log): caught by the symmetry check.
    with pytest.raises(AssertionError, match="^dist symmetric"):
        check_dist(SkewLog(), x0, x1, atol=1e-9)
    check_dist(Sphere(), x0, x1, atol=1e-9)


def test_checker_rejects_bad_inputs_clearly() -> None:
    m = Sphere()
    x0, x1 = _pair()
    with pytest.raises(ValueError, match="one shape and dtype"):
        check_manifold(m, x0, x1.float())
    with pytest.raises(AssertionError, match="^input x1 is a point: .*apply projx"):
        check_manifold(m, x0, 2 * x1)


# --------------------------------------------------------------------------------------- angle-accuracy helpers
@pytest.mark.parametrize("theta", [1e-6, 1e-3, 1.0, 3.0, math.pi - 1e-3])
@pytest.mark.parametrize("radius", [1.0, math.sqrt(32), 1e-6, 1e6])
def test_angle_pairs_lie_on_the_sphere_at_the_angle(theta: float, radius: float) -> None:
    x, y = angle_pairs(theta, 50, 16, radius=radius, seed=3)
    assert x.shape == y.shape == (50, 16) and x.dtype == y.dtype == torch.float32
    for p in (x, y):
        assert float((p.double().norm(dim=-1) / radius - 1).abs().max()) < 1e-6
    # float32 rounding moves each coordinate by ~6e-8 relative: the angle by at most a few 1e-8 rad.
    assert float((exact_angle(x, y) - theta).abs().max()) < 1e-7


def test_angle_pairs_seed_and_generator() -> None:
    a = angle_pairs(0.5, 4, 3, seed=1)
    b = angle_pairs(0.5, 4, 3, generator=torch.Generator().manual_seed(1))
    c = angle_pairs(0.5, 4, 3, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_exact_angle_against_closed_form_and_acos() -> None:
    theta = torch.tensor([0.0, 1e-12, 1e-6, 0.5, 2.0, math.pi - 1e-9, math.pi], dtype=torch.float64)
    x = torch.stack([torch.ones_like(theta), torch.zeros_like(theta)], dim=-1)
    y = 7.0 * torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1)  # scale must not matter
    ang = exact_angle(x, y)
    assert ang.dtype == torch.float64
    assert float((ang - theta).abs().max()) < 1e-15 * 4
    # A second algorithm where it is well conditioned: acos of the float64 cosine, mid-range angles.
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(100, 8, generator=g, dtype=torch.float64), torch.randn(100, 8, generator=g, dtype=torch.float64)
    cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))
    mid = cos.abs() < 0.9
    assert float((exact_angle(u, v) - torch.acos(cos))[mid].abs().max()) < 1e-13


def test_testing_module_imports_no_test_framework() -> None:
    """Users import the checker into library code too: it must import only torch, the stdlib and the geometry layer
    (read from the source, without a second interpreter: a subprocess costs seconds of torch import)."""
    tree = ast.parse(Path(testing.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "collections.abc", "torch", ".base"}, imported
