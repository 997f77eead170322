"""The sampler spec: the shifted time grid reaches the solver, and NFE per sample is stages x steps."""

from __future__ import annotations

import pytest
import torch

from manifold_fm.config import ConfigError, validate
from manifold_fm.flow import Flow
from manifold_fm.manifolds import TokenSpheres
from manifold_fm.paths import GeodesicPath
from manifold_fm.sampler import SamplerSpec, generate, network_evaluations, time_grid
from manifold_fm.solvers import integrate
from manifold_fm.time import shift_time


class _Field(torch.nn.Module):
    """A smooth, time-dependent velocity that records the times it is called at."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, 4).view(1, 4, 1, 1))
        self.times: list[float] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.times.append(float(t[0]))
        return torch.sin(3 * t).view(-1, 1, 1, 1) * self.w * x.roll(1, dims=1)


def test_shifted_grid_is_the_shift_of_the_uniform_grid() -> None:
    spec = SamplerSpec(method="euler", steps=5, time_shift=3.0)
    expected = [float(shift_time(torch.tensor(i / 5, dtype=torch.float64), 3.0)) for i in range(6)]
    assert time_grid(spec) == pytest.approx(expected, abs=0, rel=1e-15)
    assert time_grid(SamplerSpec(method="euler", steps=5)) is None  # uniform steps: the solver's own grid


def test_generate_steps_on_the_shifted_grid() -> None:
    """The Euler stages are evaluated exactly at the shifted grid's times, and the result equals integrate() on that
    grid (same noise)."""
    manifold = TokenSpheres(4)
    flow = Flow(manifold, GeodesicPath(manifold))
    spec = SamplerSpec(method="euler", steps=4, time_shift=2.5)
    model = _Field()
    out = generate(model, flow, (3, 4, 2, 2), spec, generator=torch.Generator().manual_seed(0))
    grid = [i / 4 for i in range(5)]
    shifted = [g / (2.5 - 1.5 * g) for g in grid]
    assert model.times == pytest.approx(shifted[:-1], rel=1e-6)
    x0 = flow.prior((3, 4, 2, 2), torch.Generator().manual_seed(0), "cpu", dtype=torch.float32)
    ref = integrate(lambda x, t: model(x, t), x0, manifold, time_grid=time_grid(spec), method="euler")
    assert torch.equal(out, flow.finish(ref))


@pytest.mark.parametrize("method,steps,nfe", [("euler", 16, 16), ("heun", 8, 16), ("midpoint", 8, 16), ("rk4", 4, 16)])
def test_network_evaluations_match_the_calls(method: str, steps: int, nfe: int) -> None:
    manifold = TokenSpheres(4)
    flow = Flow(manifold, GeodesicPath(manifold))
    spec = SamplerSpec(method=method, steps=steps)
    model = _Field()
    generate(model, flow, (2, 4, 2, 2), spec, generator=torch.Generator().manual_seed(1))
    assert network_evaluations(spec) == nfe == len(model.times)
    assert network_evaluations(SamplerSpec(method="dopri5")) is None


def test_time_shift_is_refused_for_adaptive_methods() -> None:
    with pytest.raises(ConfigError, match="time_shift"):
        validate(SamplerSpec, {"method": "dopri5", "time_shift": 3.0})
