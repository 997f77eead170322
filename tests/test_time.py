"""Time samplers and the SD3/LightningDiT time shift in the t=0-noise convention."""

from __future__ import annotations

import math

import pytest
import torch

from manifold_fm.time import (
    LogitNormalTime,
    ShiftedTime,
    UniformTime,
    build_time_sampler,
    shift_time,
    shift_time_grid,
)


def test_uniform_is_seeded_and_uniform() -> None:
    a = UniformTime().sample(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b = UniformTime().sample(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(a, b) and a.shape == (20000,)
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    # Kolmogorov-Smirnov distance against U[0, 1]
    s = a.sort().values
    ks = float((s - torch.arange(1, 20001, dtype=torch.float64) / 20000).abs().max())
    assert ks < 0.012


def test_logit_normal_moments() -> None:
    g = torch.Generator().manual_seed(1)
    t = LogitNormalTime(mean=0.5, std=0.8).sample(40000, generator=g, dtype=torch.float64)
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean()) - 0.5) < 0.02
    assert abs(float(logit.std()) - 0.8) < 0.02


def test_shift_matches_sd3_formula_on_the_noise_level() -> None:
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.5, 1.0, 3.0):
        sigma = 1 - t
        sd3 = s * sigma / (1 + (s - 1) * sigma)  # SD3: sigma = 1 is noise
        torch.testing.assert_close(1 - shift_time(t, s), sd3)


def test_shift_fixes_ends_is_monotone_and_pushes_toward_noise() -> None:
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    st = shift_time(t, 3.0)
    assert float(st[0]) == 0.0 and float(st[-1]) == 1.0
    assert bool((st[1:] > st[:-1]).all())
    assert bool((st[1:-1] < t[1:-1]).all())  # s > 1: toward t = 0 (noise)
    assert bool((shift_time(t, 0.5)[1:-1] > t[1:-1]).all())
    # composition law (an independent property of the Mobius form): shift_a o shift_b = shift_{ab}
    torch.testing.assert_close(shift_time(shift_time(t, 2.0), 1.5), shift_time(t, 3.0))


def test_shifted_sampler_quantiles_follow_the_map() -> None:
    t = ShiftedTime(UniformTime(), 3.0).sample(40000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for q in (0.1, 0.5, 0.9):
        expected = float(shift_time(torch.tensor(q, dtype=torch.float64), 3.0))
        assert abs(float(t.quantile(q)) - expected) < 0.01


def test_shift_time_grid_and_builder() -> None:
    grid = shift_time_grid(torch.linspace(0, 1, 5), 2.0)
    assert grid.shape == (5,) and float(grid[2]) == pytest.approx(0.5 / (2 - 0.5))
    assert isinstance(build_time_sampler("uniform"), UniformTime)
    assert isinstance(build_time_sampler("logit_normal", shift=2.0), ShiftedTime)
    with pytest.raises(ValueError, match="positive"):
        shift_time(torch.zeros(1), 0.0)
    with pytest.raises(ValueError, match="unknown time sampler"):
        build_time_sampler("beta")
    with pytest.raises(ValueError, match="std"):
        LogitNormalTime(std=-1.0)
    assert math.isclose(float(shift_time(torch.tensor(0.5), 1.0)), 0.5)
