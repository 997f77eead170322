"""Classifier-free guidance: one batched call, the linear combination, the time interval."""

from __future__ import annotations

import pytest
import torch

from manifold_fm.guidance import guided_velocity
from manifold_fm.manifolds import TokenSpheres
from manifold_fm.solvers import IntegrationStats, integrate

NULL = 10


class RecordingModel:
    """v(x, t, y) = x * (y + 1) + t: distinct per label, so mixing up branches is visible."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        shape = (-1,) + (1,) * (x.ndim - 1)
        return x * (y.to(x.dtype).reshape(shape) + 1) + t.reshape(shape)


def test_guided_combination_in_one_batched_call() -> None:
    model = RecordingModel()
    x = torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.1, 0.5, 0.9])
    y = torch.tensor([0, 3, 7])
    v = guided_velocity(model, y, scale=2.5, null_class=NULL)(x, t)
    assert model.batches == [6]
    ref_c = RecordingModel()(x, t, y)
    ref_u = RecordingModel()(x, t, torch.full_like(y, NULL))
    torch.testing.assert_close(v, ref_u + 2.5 * (ref_c - ref_u))


def test_scale_one_and_outside_interval_skip_the_unconditional_branch() -> None:
    model = RecordingModel()
    x, y = torch.randn(2, 5), torch.tensor([1, 2])
    t = torch.tensor([0.2, 0.3])
    torch.testing.assert_close(guided_velocity(model, y, 1.0, NULL)(x, t), RecordingModel()(x, t, y))
    torch.testing.assert_close(
        guided_velocity(model, y, 4.0, NULL, interval=(0.5, 0.9))(x, t), RecordingModel()(x, t, y)
    )
    assert model.batches == [2, 2]


def test_interval_applies_guidance_per_sample() -> None:
    model = RecordingModel()
    x, y = torch.randn(3, 5), torch.tensor([1, 2, 3])
    t = torch.tensor([0.1, 0.5, 0.95])
    v = guided_velocity(model, y, 3.0, NULL, interval=(0.4, 0.9))(x, t)
    c = RecordingModel()(x, t, y)
    u = RecordingModel()(x, t, torch.full_like(y, NULL))
    torch.testing.assert_close(v[0], c[0])
    torch.testing.assert_close(v[1], u[1] + 3.0 * (c[1] - u[1]))
    torch.testing.assert_close(v[2], c[2])
    assert model.batches == [6]


def test_guided_sampling_stays_on_token_spheres_and_counts_calls() -> None:
    m = TokenSpheres(4, axis=1)
    model = RecordingModel()
    x0 = m.random_base((2, 4, 3, 3), torch.Generator().manual_seed(0))
    stats = IntegrationStats()
    x = integrate(guided_velocity(model, torch.tensor([0, 1]), 1.5, NULL), x0, m, steps=6, method="heun", stats=stats)
    assert float(m.point_error(x).max()) < 1e-5
    assert stats.nfe == 12 and model.batches == [4] * 12


def test_bad_interval_and_labels() -> None:
    with pytest.raises(ValueError, match="t_lo <= t_hi"):
        guided_velocity(RecordingModel(), torch.tensor([0]), 2.0, NULL, interval=(0.8, 0.2))
    v = guided_velocity(RecordingModel(), torch.tensor([0, 1, 2]), 2.0, NULL)
    with pytest.raises(ValueError, match="labels"):
        v(torch.randn(2, 3), torch.zeros(2))
