"""The strict config loader: typed values, dotted overrides, one-line errors naming the key; the run schema."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field, field_validator

from manifold_fm.config import (
    ConfigError,
    Section,
    StrictBool,
    apply_overrides,
    builtin_configs,
    load_config,
    save_config,
    to_dict,
    validate,
)
from manifold_fm.training.schema import (
    KINDS,
    DefaultRunConfig,
    ImageRunConfig,
    ToyRunConfig,
    image_run_config,
    load_run_config,
)


class Opt(Section):
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)

    @field_validator("lr")
    @classmethod
    def _positive(cls, lr: float) -> float:
        if lr <= 0:
            raise ValueError("must be positive")
        return lr


class Cfg(Section):
    name: str
    steps: int = 10
    path: Literal["geodesic", "linear"] = "geodesic"
    opt: Opt = Field(default_factory=Opt)
    out: Path | None = None
    flag: StrictBool = False


def test_nested_typed_load_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: run\nopt:\n  lr: 1e-3\n")  # YAML reads 1e-3 as a string: still a float here
    cfg = load_config(Cfg, f, overrides=["steps=20", "opt.betas=[0.8, 0.9]", "path=linear", "out=/tmp/x"])
    assert cfg == Cfg(name="run", steps=20, path="linear", opt=Opt(lr=1e-3, betas=(0.8, 0.9)), out=Path("/tmp/x"))
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(Cfg, tmp_path / "saved.yaml") == cfg
    assert to_dict(cfg)["opt"]["betas"] == [0.8, 0.9]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "a", "stpes": 3}, "unknown config key 'stpes' (did you mean 'steps'?)"),
        ({"name": "a", "opt": {"lrr": 1}}, "unknown config key 'opt.lrr' (did you mean 'opt.lr'?)"),
        ({"name": "a", "steps": "many"}, "steps: expected an integer, got 'many'"),
        ({"name": "a", "path": "lineer"}, "path: 'lineer' is not one of 'geodesic', 'linear' (did you mean 'linear'?)"),
        ({"name": "a", "flag": "yes"}, "flag: expected true or false"),
        ({"steps": 3}, "missing required config key 'name'"),
        ({"name": "a", "opt": 3}, "opt: expected a section"),
        ({"name": "a", "opt": {"lr": -1}}, "opt.lr: must be positive"),
        ({"name": "a", "opt": {"betas": [0.9]}}, "opt.betas: too few values"),
        ({"name": "a", "steps": 2.5}, "steps: expected an integer, got 2.5"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as info:
        validate(Cfg, data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_override_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="must look like key=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ConfigError, match="'name' is a value, not a section"):
        apply_overrides({"name": "a"}, ["name.x=1"])
    with pytest.raises(ConfigError, match="neither a file nor a built-in config"):
        load_config(Cfg, "no-such-config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(Cfg, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Cfg, lst)


def test_every_builtin_config_loads_as_its_kind_and_round_trips(tmp_path):
    for name in builtin_configs():
        cfg = load_run_config(name)
        assert type(cfg) is KINDS[cfg.kind]
        save_config(cfg, tmp_path / f"{name}.yaml")
        assert load_run_config(tmp_path / f"{name}.yaml") == cfg


def test_the_kinds_share_their_sections():
    """model, flow, optim, train and sample are one class each, whatever the kind: a key means the same everywhere."""
    for section in ("model", "flow", "optim", "train", "sample"):
        classes = {kind.model_fields[section].annotation for kind in (ToyRunConfig, ImageRunConfig, DefaultRunConfig)}
        assert len(classes) == 1, (section, classes)


@pytest.mark.parametrize(
    ("source", "overrides", "message"),
    [
        ("toy-sphere", ["flow.latent=spherical"], "flow.latent: applies to latent-image runs"),
        ("toy-sphere", ["model.arch=SiT-B/2"], "model.arch: manifold runs train arch 'mlp'"),
        ("image-builtin", ["model.hidden=32"], "model.hidden: applies to arch 'mlp' only"),
        ("image-builtin", ["sample.method=eular"], "sample.method: unknown solver 'eular'"),
        ("image-builtin", ["sample.method=dopri5", "sample.transport=ambient"], "sample.transport: 'ambient' applies"),
        ("default", ["modes=[spherical, slerp]"], "modes: must be a non-empty list of linear, shell, spherical-line"),
        ("image-builtin", ["flow.path=geodesic", "flow.latent=vanilla"], "flow.path: the geodesic (slerp) path"),
        ("image-builtin", ["flow.path=linear", "flow.projection=on"], "flow.projection: the tangent projection"),
        ("image-builtin", ["flow.path=shell", "flow.sampler=exp-map"], "flow.sampler: exp-map steps need"),
        ("toy-sphere", ["flow.path=shell"], "flow.path: 'shell' is a latent-image path"),
        ("default", ["flow.path=linear"], "flow: the default run's flows are its modes"),
        ("default", ["train.mixed_precision=true"], "train.mixed_precision: expected one of"),
        ({"kind": "audio"}, [], "kind: 'audio' is not one of 'manifold', 'toy', 'image', 'default'"),
    ],
)
def test_run_schema_refuses_bad_combinations_in_one_line(source, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_run_config(source, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_default_run_modes_are_image_runs_with_the_shared_sections():
    cfg = load_run_config("default", ["train.steps=7", "optim.lr=0.01", "sample.steps=3"])
    for mode, path, latent in (("spherical", "geodesic", "spherical"), ("linear", "linear", "vanilla")):
        run = image_run_config(cfg, mode, Path("/d.safetensors"))
        assert (run.flow.path, run.flow.resolved_latent, run.flow.preset) == (path, latent, mode)
        assert run.train.steps == 7 and run.optim.lr == 0.01 and run.sample.steps == 3 and run.model == cfg.model
        assert (run.tokenizer.decoder_state is not None) == (mode == "spherical")
        assert load_config(ImageRunConfig, to_dict(run)) == run  # what load_run reads back from a checkpoint
