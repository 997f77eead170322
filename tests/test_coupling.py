"""Minibatch OT with the geodesic cost: brute force over permutations and a plain loop as references."""

from __future__ import annotations

import itertools

import pytest
import torch

import manifold_fm.manifolds.base as base_mod
import manifold_fm.manifolds.sphere as sphere_mod
from manifold_fm.coupling import IndependentCoupling, OTCoupling, build_coupling, geodesic_cost_matrix
from manifold_fm.manifolds import Euclidean, Manifold, Sphere, TokenSpheres

D64 = torch.float64


def total_cost(m, x0, x1) -> float:
    return float(m.dist(x0, x1).square().reshape(x0.shape[0], -1).sum())


def test_cost_matrix_equals_a_loop_of_squared_distances(monkeypatch: pytest.MonkeyPatch) -> None:
    m = TokenSpheres(4, axis=1)
    g = torch.Generator().manual_seed(0)
    x0, x1 = m.random_base((5, 4, 2, 3), g, dtype=D64), m.random_base((7, 4, 2, 3), g, dtype=D64)
    monkeypatch.setattr(sphere_mod, "_COST_CHUNK", 50)  # force several row chunks
    monkeypatch.setattr(base_mod, "_PAIRWISE_CHUNK", 50)
    c = geodesic_cost_matrix(m, x0, x1)
    sph = Sphere(2.0)
    for i in range(5):
        for j in range(7):
            ref = sum(
                float(sph.dist(x0[i, :, a, b], x1[j, :, a, b])) ** 2 for a in range(2) for b in range(3)
            )  # sum over tokens of (R * angle)^2
            assert abs(float(c[i, j]) - ref) < 1e-10
    assert c.shape == (5, 7)
    # the dot-product override agrees with the base class's generic per-pair dist, in float64 and float32
    torch.testing.assert_close(Manifold.pairwise_sq_dist(m, x0, x1), c, atol=1e-10, rtol=0)
    c_generic = Manifold.pairwise_sq_dist(m, x0.float(), x1.float())
    torch.testing.assert_close(geodesic_cost_matrix(m, x0.float(), x1.float()), c_generic, atol=1e-4, rtol=1e-5)
    lin = Euclidean()
    torch.testing.assert_close(lin.pairwise_sq_dist(x0, x1), Manifold.pairwise_sq_dist(lin, x0, x1), atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "manifold,shape", [(Sphere(), (6, 3)), (TokenSpheres(3, axis=-1), (6, 4, 3)), (Euclidean(), (6, 2))]
)
def test_ot_equals_brute_force_optimum(manifold, shape) -> None:
    g = torch.Generator().manual_seed(1)
    x0, x1 = manifold.random_base(shape, g, dtype=D64), manifold.random_base(shape, g, dtype=D64)
    px0, px1, y = OTCoupling(manifold).pair(x0, x1)
    assert y is None and torch.equal(px1, x1)
    best = min(total_cost(manifold, x0[list(p)], x1) for p in itertools.permutations(range(6)))
    assert abs(total_cost(manifold, px0, x1) - best) < 1e-9
    assert total_cost(manifold, px0, x1) <= total_cost(manifold, x0, x1) + 1e-12
    # x0 rows are a permutation of the input rows
    assert sorted(map(tuple, px0.reshape(6, -1).tolist())) == sorted(map(tuple, x0.reshape(6, -1).tolist()))


def test_ot_with_labels_is_optimal_within_each_class_and_keeps_pairs() -> None:
    m = Sphere()
    g = torch.Generator().manual_seed(2)
    x0, x1 = m.random_base((9, 3), g, dtype=D64), m.random_base((9, 3), g, dtype=D64)
    y = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 1])
    px0, px1, py = OTCoupling(m).pair(x0, x1, y)
    assert torch.equal(px1, x1) and torch.equal(py, y)
    start = 0
    for cls in (0, 1, 2):  # classes in sorted order take consecutive groups of noise rows
        idx = torch.nonzero(y == cls).flatten()
        group = x0[start : start + len(idx)]
        start += len(idx)
        got = px0[idx]
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, group.tolist()))
        best = min(total_cost(m, group[list(p)], x1[idx]) for p in itertools.permutations(range(len(idx))))
        assert abs(total_cost(m, got, x1[idx]) - best) < 1e-9


def test_blocks_beyond_max_exact_and_independent() -> None:
    m = Sphere()
    g = torch.Generator().manual_seed(3)
    x0, x1 = m.random_base((10, 3), g, dtype=D64), m.random_base((10, 3), g, dtype=D64)
    px0, _, _ = OTCoupling(m, max_exact=4).pair(x0, x1)
    for s in range(0, 10, 4):  # each block is permuted only within itself
        blk = px0[s : s + 4]
        assert sorted(map(tuple, blk.tolist())) == sorted(map(tuple, x0[s : s + 4].tolist()))
    a, b, c = IndependentCoupling().pair(x0, x1, None)
    assert a is x0 and b is x1 and c is None
    assert isinstance(build_coupling("ot", m), OTCoupling)
    with pytest.raises(ValueError, match="unknown coupling"):
        build_coupling("sinkhorn", m)
    with pytest.raises(ValueError, match="labels"):
        OTCoupling(m).pair(x0, x1, torch.zeros(3))
