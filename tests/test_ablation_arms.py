"""The paper's four ablation arms as flow settings (``linear``, ``shell``, ``spherical-linear``, ``spherical``): each
setting does what it says (checked against direct computations on the tensors), and every arm trains, samples and
resumes from the command line on the built-in data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from manifold_fm.cli import main
from manifold_fm.paths import PathSample
from manifold_fm.sampler import SamplerSpec, generate
from manifold_fm.training.builders import latent_flow, preset_flow
from manifold_fm.training.schema import FLOW_PRESETS, load_image_config

from helpers import assert_resumed, log_lines, tiny_image_run

C, R = 4, 2.0  # channels, radius sqrt(C)
ARMS = list(FLOW_PRESETS)


def _norms(x: torch.Tensor) -> torch.Tensor:
    return x.double().norm(dim=1)


def _draw(arm: str, seed: int = 0) -> tuple[object, PathSample]:
    flow = preset_flow(arm, C)
    g = torch.Generator().manual_seed(seed)
    x1 = flow.prepare_data(1.7 * torch.randn(16, C, 3, 3, generator=g))
    return flow, flow.sample_path(x1, g)[0]


@pytest.mark.parametrize("arm", ARMS)
def test_latent_and_prior_follow_the_settings(arm: str) -> None:
    settings = FLOW_PRESETS[arm]
    _, s = _draw(arm)
    on_spheres = lambda x: bool(torch.allclose(_norms(x), torch.full_like(_norms(x), R), atol=1e-5))  # noqa: E731
    assert on_spheres(s.x1) == (settings["latent"] == "spherical")
    assert on_spheres(s.x0) == (settings["prior"] == "uniform")
    if settings["prior"] == "gaussian":  # N(0, I) tokens of 4 channels: mean squared norm 4
        assert abs(float(s.x0.square().sum(1).mean()) - C) < 0.5


@pytest.mark.parametrize("arm", ARMS)
def test_each_path_is_the_one_named(arm: str) -> None:
    _, s = _draw(arm)
    t = s.t.view(-1, 1, 1, 1).double()
    x0, x1 = s.x0.double(), s.x1.double()
    path = FLOW_PRESETS[arm]["path"]
    if path == "linear":  # the straight line (a chord inside the ball for spherical endpoints)
        torch.testing.assert_close(s.x_t.double(), (1 - t) * x0 + t * x1, atol=1e-6, rtol=0)
        torch.testing.assert_close(s.u_t.double(), x1 - x0, atol=1e-6, rtol=0)
        if arm == "spherical-linear":
            assert float(_norms(s.x_t).min()) < R - 0.1
    elif path == "shell":  # token radii interpolated linearly, directions on the arc
        expected = (1 - t.squeeze(1)) * _norms(x0) + t.squeeze(1) * _norms(x1)
        torch.testing.assert_close(_norms(s.x_t), expected, atol=1e-5, rtol=0)
    else:  # slerp: on the spheres, constant speed R * angle
        torch.testing.assert_close(_norms(s.x_t), torch.full_like(_norms(s.x_t), R), atol=1e-5, rtol=0)
        cos = (x0 * x1).sum(1) / R**2
        torch.testing.assert_close(_norms(s.u_t), R * torch.arccos(cos.clamp(-1, 1)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arm", ARMS)
def test_the_tangent_projection_is_on_only_where_set(arm: str) -> None:
    """A prediction differing from the target by a radial vector costs nothing iff the projection is on."""
    flow, s = _draw(arm)
    radial = s.u_t + 0.7 * s.x_t
    projected = FLOW_PRESETS[arm]["projection"] == "on"
    assert (float(flow.loss(radial, s)) < 1e-10) == projected
    assert float(flow.loss(s.u_t, s)) < 1e-10


@pytest.mark.parametrize("arm", ARMS)
def test_the_sampler_steps_on_the_spheres_or_in_the_latent_space(arm: str) -> None:
    """exp-map steps keep every intermediate state on the spheres; ambient steps do not, and spherical-latent
    samples are projected onto the spheres at the end."""
    flow = preset_flow(arm, C)

    class Outward(torch.nn.Module):  # a velocity with a radial part
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.w * x + torch.roll(x, 1, dims=1)

    seen: list[torch.Tensor] = []
    model = Outward()
    model.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    out = generate(model, flow, (4, C, 2, 2), SamplerSpec(method="euler", steps=4), generator=torch.Generator())
    settings = FLOW_PRESETS[arm]
    inside = [float((_norms(x) - R).abs().max()) for x in seen[1:]]
    if settings["sampler"] == "exp-map":
        assert max(inside) < 1e-5
    elif settings["latent"] == "spherical":
        assert max(inside) > 0.1 and float((_norms(out) - R).abs().max()) < 1e-5
    else:
        assert float((_norms(out) - R).abs().max()) > 0.1  # vanilla latents are not constrained


def test_presets_and_settings_agree() -> None:
    for arm in ARMS:
        cfg = load_image_config("image-builtin", [f"flow.preset={arm}"])
        assert cfg.flow.resolved == FLOW_PRESETS[arm] and cfg.flow.preset == arm
        assert latent_flow(cfg.flow, C).name == arm
    custom = load_image_config("image-builtin", ["flow.path=linear", "flow.latent=spherical", "flow.prior=gaussian"])
    assert custom.flow.preset == "custom"


def test_every_arm_trains_samples_and_resumes_from_the_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    base = tiny_image_run("train.checkpoint_every=2", "sample.steps=2")
    for arm in ARMS:
        out = tmp_path / arm
        args = ["train", *base, "--set", f"flow.preset={arm}", "--out", str(out)]
        first = runner.invoke(main, [*args, "--steps", "2"])
        assert first.exit_code == 0, first.output
        before = log_lines(out)
        resumed = runner.invoke(main, [*args, "--steps", "3", "--resume", "--extend"])
        assert resumed.exit_code == 0, resumed.output
        assert_resumed(out, 2, 3, before)  # the third step only, from the step-2 checkpoint
        meta = json.loads((out / "checkpoints" / "step_00000003" / "meta.json").read_text())
        assert meta["flow"] == arm and meta["config"]["flow"]["path"] == FLOW_PRESETS[arm]["path"]
        sampled = runner.invoke(main, ["sample", str(out), "--num", "4", "--no-grid", "--out", str(out / "s")])
        assert sampled.exit_code == 0, sampled.output
        with np.load(out / "s" / "samples.npz") as d:
            assert d["arr_0"].shape == (4, 32, 32, 3)
        info = json.loads((out / "s" / "sample_info.json").read_text())
        assert info["flow"] == arm
