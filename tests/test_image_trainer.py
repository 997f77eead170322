"""Image trainer: config validation, the loss wiring per mode, class dropout, learning, and train_image end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import Tensor, nn

from manifold_fm.cli import main
from manifold_fm.config import ConfigError
from manifold_fm.data.sources import TensorSource
from manifold_fm.models.sit import SiT
from manifold_fm.seeding import seeded_generator
from manifold_fm.training.builders import preset_flow
from manifold_fm.training.flow_objective import FlowObjective
from manifold_fm.training.image import train_image
from manifold_fm.training.metrics_log import read_jsonl
from manifold_fm.training.schema import load_image_config
from manifold_fm.training.trainer import Trainer

PATH = {"spherical": "geodesic", "linear": "linear"}

LATENT_CFG = ["tokenizer.kind=none", "data.source=latents", "data.latents=unused", "train.log_every=1"]


def test_config_rejects_unknown_keys_and_bad_values_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz' \(did you mean 'train.steps'\?\)"):
        load_image_config("image-builtin", ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"flow.path: 'slerp' is not one of 'geodesic', 'linear', 'shell'"):
        load_image_config("image-builtin", ["flow.path=slerp"])
    with pytest.raises(ConfigError, match=r"model.arch: image runs train a SiT"):
        load_image_config("image-builtin", ["model.arch=mlp"])
    with pytest.raises(ConfigError, match=r"model.arch: unknown SiT config 'SiT-Q/2'"):
        load_image_config("image-builtin", ["model.arch=SiT-Q/2"])
    with pytest.raises(ConfigError, match=r"train.class_dropout: input should be less than 1, got 1.5"):
        load_image_config("image-builtin", ["train.class_dropout=1.5"])
    with pytest.raises(ConfigError, match="data.latents: required"):
        load_image_config(None, ["data.source=latents"])
    cfg = load_image_config("image-builtin", ["flow.path=linear", "optim.betas=[0.9, 0.95]"])
    assert cfg.flow.preset == "linear" and cfg.flow.resolved_latent == "vanilla" and cfg.optim.betas == (0.9, 0.95)


class RadialModel(nn.Module):
    """Predicts ``alpha * x_t``: purely normal to the token spheres at ``x_t``."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(alpha))
        self.seen_labels: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.seen_labels.append(y)
        return self.alpha * x


def _trainer(tmp_path: Path, model: nn.Module, mode: str, data: TensorSource, *extra: str) -> Trainer:
    cfg = load_image_config(None, [*LATENT_CFG, f"flow.path={PATH[mode]}", "train.batch_size=16", *extra])
    return Trainer(
        FlowObjective(model, preset_flow(mode, data.data.shape[1]), cfg.optim, null_class=3),
        data,
        cfg.train,
        tmp_path,
        device="cpu",
        progress=False,
    )


def _loss_on(trainer: Trainer, model: nn.Module, x1: Tensor, y: Tensor | None, step: int) -> Tensor:
    """The flow-matching loss of ``model`` on ``(x1, y)`` with the draws of step ``step``."""
    return trainer.objective.loss_on(trainer.context(step), model, x1, y)


def test_spherical_loss_ignores_the_normal_component_and_linear_does_not(tmp_path: Path) -> None:
    data = TensorSource(torch.randn(32, 5, 3, 3, dtype=torch.float32), torch.arange(32) % 3)
    x1, y = data.data[:16], data.labels[:16]
    alphas = (0.0, 2.5)
    sph = [_loss_on(_trainer(tmp_path, RadialModel(a), "spherical", data), RadialModel(a), x1, y, 7) for a in alphas]
    # Independent reference: with a zero prediction the loss is the mean squared target |u_t|^2 = (R w)^2 per token.
    trainer = _trainer(tmp_path, RadialModel(0.0), "spherical", data)
    g = seeded_generator(trainer.train.seed, 7, 0)  # step 7's draws: the generator of (seed, step, 0)
    torch.rand(16, generator=g)  # the class-dropout draw comes first
    flow = trainer.objective.flow
    flow.time_sampler.sample(16, generator=g, dtype=torch.float32)  # t: the spherical target speed is R w
    x0 = flow.prior((16, 5, 3, 3), g, torch.device("cpu")).double()
    xd = x1.double() / x1.double().norm(dim=1, keepdim=True) * 5**0.5
    x0 = x0 / x0.norm(dim=1, keepdim=True) * 5**0.5
    # angle between points of radius R: cos w = <x0, x1> / R^2, sin w = |x0 - <x0, x1> x1 / R^2| / R
    w = torch.atan2((x0 - (x0 * xd).sum(1, keepdim=True) / 5 * xd).norm(dim=1) * 5**0.5, (x0 * xd).sum(1))
    expected = ((5**0.5 * w) ** 2).sum(dim=(1, 2)) / (5 * 9)
    assert torch.allclose(sph[0].double(), expected.mean(), rtol=1e-4)
    assert torch.allclose(sph[0], sph[1], rtol=1e-5)
    lin = [
        _loss_on(_trainer(tmp_path, RadialModel(a), "linear", data), RadialModel(a), x1, y, step=7) for a in (0.0, 2.5)
    ]
    assert abs(lin[0].item() - lin[1].item()) > 0.1


def test_class_dropout_rate_and_null_label(tmp_path: Path) -> None:
    data = TensorSource(torch.randn(4000, 2, 1, 1), torch.arange(4000) % 3)
    model = RadialModel(1.0)
    trainer = _trainer(tmp_path, model, "linear", data, "train.class_dropout=0.25")
    _loss_on(trainer, model, data.data, data.labels, step=0)
    y = model.seen_labels[-1]
    dropped = y == 3
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    assert torch.equal(y[~dropped], data.labels[~dropped])


@pytest.mark.parametrize("mode", ["spherical", "linear"])
def test_training_lowers_the_loss(tmp_path: Path, mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    # Two classes of fixed latents: an easy target the flow should fit quickly.
    protos = torch.randn(2, 4, 2, 2, generator=g)
    labels = torch.arange(64) % 2
    data = TensorSource(protos[labels] + 0.05 * torch.randn(64, 4, 2, 2, generator=g), labels)
    model = SiT(input_size=2, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=2)
    cfg = load_image_config(
        None,
        [
            *LATENT_CFG,
            f"flow.path={PATH[mode]}",
            "train.batch_size=32",
            "train.steps=80",
            "optim.lr=3e-3",
            "train.checkpoint_every=1000",
        ],
    )
    objective = FlowObjective(model, preset_flow(mode, 4), cfg.optim, null_class=2)
    Trainer(objective, data, cfg.train, tmp_path, device="cpu", progress=False).fit()
    losses = [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert len(losses) == 80
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_train_image_end_to_end_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "train",
        "--config",
        "image-builtin",
        "--out",
        str(out),
        "--steps",
        "4",
        "--set",
        "data.per_class=2",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.sample_every=2",
        "--set",
        "train.checkpoint_every=2",
        "--set",
        "sample.steps=2",
        "--set",
        "sample.grid_per_class=1",
        "--set",
        "train.log_every=1",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "config.yaml").is_file()
    assert (out / "samples" / "step_00000002.png").is_file() and (out / "samples" / "step_00000004.png").is_file()
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["samples_per_s"] > 0 and r["loss"] > 0 for r in records)
    meta = json.loads((out / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["latent_shape"] == [16, 8, 8] and meta["num_classes"] == 12 and meta["flow"] == "spherical"
    assert (out / "checkpoints" / "step_00000004" / "ema.safetensors").is_file()
    # Resuming a finished run says so and changes nothing; a bad key is one line naming it.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = CliRunner().invoke(main, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert again.output.startswith(f"{out} holds a finished image run (4 steps)") and "nothing to do" in again.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    bad = CliRunner().invoke(main, ["train", "--config", "image-builtin", "--out", str(out), "--set", "optim.lr=-1"])
    assert bad.exit_code != 0 and "optim.lr: input should be greater than 0, got -1" in bad.output
    # without --resume an existing run is not overwritten
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "already holds a run" in again.output and "Traceback" not in again.output


def test_train_image_on_a_latent_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training from a latent cache loads no tokenizer unless something decodes: without grids or evaluations none
    at all (the checkpoint still names it), with sample grids once, at the first grid."""
    from manifold_fm.data.builtin_images import BuiltinImages
    from manifold_fm.data.latents import extract_latents
    from manifold_fm.tokenizers import builtin_tokenizer
    from manifold_fm.training import image

    extract_latents(
        builtin_tokenizer(), BuiltinImages("train", per_class=1), tmp_path / "cache", batch_size=12, progress=False
    )
    loads: list[int] = []
    real = image.load_tokenizer
    monkeypatch.setattr(image, "load_tokenizer", lambda *a, **k: loads.append(1) or real(*a, **k))
    settings = [
        "data.source=latents",
        f"data.latents={tmp_path / 'cache'}",
        "train.steps=2",
        "train.batch_size=8",
        "train.sample_every=null",
        "flow.path=linear",
    ]
    ckpt = train_image("image-builtin", settings, tmp_path / "run", progress=False)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["latent_shape"] == [16, 8, 8] and meta["num_classes"] == 12 and meta["step"] == 2
    assert loads == [] and meta["tokenizer"] == builtin_tokenizer().name
    train_image("image-builtin", [*settings, "train.sample_every=1"], tmp_path / "grids", progress=False)
    assert loads == [1] and len(list((tmp_path / "grids" / "samples").glob("*.png"))) == 2


def test_the_tokenizer_name_is_known_without_loading_it() -> None:
    from manifold_fm.training.image import load_tokenizer, tokenizer_name

    cfg = load_image_config("image-builtin", [])
    assert tokenizer_name(cfg) == load_tokenizer(cfg).name
