"""The tangent-projected flow-matching loss against a float64 recomputation."""

from __future__ import annotations

import geoopt
import pytest
import torch

from manifold_fm.loss import flow_matching_loss
from manifold_fm.manifolds import GeooptManifold, Sphere, TokenSpheres
from manifold_fm.paths import GeodesicPath, LinearPath

D64 = torch.float64


def _sample(m, shape, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    x0, x1 = m.random_base(shape, g, dtype=dtype), m.random_base(shape, g, dtype=dtype)
    t = torch.rand(shape[0], generator=g, dtype=dtype)
    return GeodesicPath(m).sample(x0, x1, t), g


def test_ambient_loss_matches_manual_projection_and_ignores_normal_part() -> None:
    m = TokenSpheres(4, axis=1)
    s, g = _sample(m, (3, 4, 2, 5))
    pred = torch.randn(3, 4, 2, 5, generator=g, dtype=D64)
    # manual: per token P v = v - <v, x>/|x|^2 x along the channel axis
    d = pred - s.u_t
    xt = s.x_t
    pd = d - (d * xt).sum(1, keepdim=True) / (xt * xt).sum(1, keepdim=True) * xt
    ref_none = pd.square()
    torch.testing.assert_close(flow_matching_loss(m, pred, s, reduction="none"), ref_none)
    torch.testing.assert_close(flow_matching_loss(m, pred, s, reduction="per_sample"), ref_none.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(flow_matching_loss(m, pred, s), ref_none.mean())
    # a normal component added to the prediction changes nothing
    bumped = pred + 3.7 * xt
    torch.testing.assert_close(flow_matching_loss(m, bumped, s), flow_matching_loss(m, pred, s))
    # exact tangent prediction -> zero loss
    assert float(flow_matching_loss(m, s.u_t + 0.5 * xt, s)) < 1e-20


def test_riemannian_equals_ambient_on_spheres_and_scales_on_poincare() -> None:
    m = Sphere()
    s, g = _sample(m, (6, 3), seed=1)
    pred = torch.randn(6, 3, generator=g, dtype=D64)
    torch.testing.assert_close(
        flow_matching_loss(m, pred, s, "per_sample", metric="riemannian"), flow_matching_loss(m, pred, s, "per_sample")
    )
    ball = GeooptManifold(geoopt.PoincareBall())
    sb, gb = _sample(ball, (6, 2), seed=2)
    predb = torch.randn(6, 2, generator=gb, dtype=D64)
    lam2 = (2 / (1 - sb.x_t.square().sum(-1))) ** 2
    amb = flow_matching_loss(ball, predb, sb, "per_sample")
    torch.testing.assert_close(flow_matching_loss(ball, predb, sb, "per_sample", metric="riemannian"), lam2 * amb)
    assert flow_matching_loss(ball, predb, sb, "none", metric="riemannian").shape == (6,)


def test_low_precision_prediction_is_compared_in_float32_and_differentiable() -> None:
    m = TokenSpheres(8, axis=-1)
    s, g = _sample(m, (4, 3, 8), seed=3, dtype=torch.float32)
    pred = torch.randn(4, 3, 8, generator=g).requires_grad_(True)
    loss32 = flow_matching_loss(m, pred, s)
    loss_bf = flow_matching_loss(m, pred.bfloat16(), s)
    assert loss_bf.dtype == torch.float32
    assert abs(loss_bf.item() - loss32.item()) < 2e-2 * loss32.item()
    loss32.backward()
    assert pred.grad is not None and bool(torch.isfinite(pred.grad).all())


def test_linear_path_loss_is_plain_mse() -> None:
    g = torch.Generator().manual_seed(4)
    x0, x1, pred = (torch.randn(5, 7, generator=g) for _ in range(3))
    path = LinearPath()
    s = path.sample(x0, x1, torch.rand(5, generator=g))
    torch.testing.assert_close(flow_matching_loss(path.manifold, pred, s), ((pred - (x1 - x0)) ** 2).mean())


def test_bad_arguments() -> None:
    m = Sphere()
    s, _ = _sample(m, (2, 3))
    with pytest.raises(ValueError, match="differs"):
        flow_matching_loss(m, torch.zeros(2, 4, dtype=D64), s)
    with pytest.raises(ValueError, match="unknown reduction"):
        flow_matching_loss(m, s.u_t, s, reduction="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown metric"):
        flow_matching_loss(m, s.u_t, s, metric="l1")  # type: ignore[arg-type]
