"""The strict config loader: typed values, dotted overrides, one-line errors naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from manifold_fm.config import ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict


@dataclass
class Opt:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Cfg:
    name: str
    steps: int = 10
    path: Literal["geodesic", "linear"] = "geodesic"
    opt: Opt = field(default_factory=Opt)
    out: Path | None = None
    flag: bool = False


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
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as info:
        from_dict(Cfg, data)
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
