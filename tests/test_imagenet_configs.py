"""The ImageNet-256 config grid (experiments/imagenet_sfm/configs): strict loading, pair discipline, paper settings."""

from __future__ import annotations

import importlib.util
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from manifold_fm.config import ConfigError, load_config, to_dict
from manifold_fm.training.schema import ImageRunConfig, load_image_config

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments" / "imagenet_sfm"
CONFIGS = sorted((EXP / "configs").glob("*.yaml"))
IMAGENET_TRAIN_IMAGES = 1_281_167
# The only keys by which two arms of one grid point may differ: the method itself (the five settings of its flow
# preset), the decoder finetuned to decode projected tokens, and the run name.
# Every arm reads the same latent cache (spherical-latent runs project its denormalised latents).
FLOW_KEYS = {f"flow.{k}" for k in ("latent", "prior", "path", "projection", "sampler")}
METHOD_KEYS = {"name", "tokenizer.decoder_state", *FLOW_KEYS}
ABLATION = ["flux2-B2-linear-80ep", "flux2-B2-shell-80ep", "flux2-B2-spherical-linear-80ep", "flux2-B2-spherical-80ep"]


def _load_script(name: str) -> Any:
    path = EXP / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"imagenet_sfm_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _pairs() -> list[tuple[Path, Path]]:
    pairs = []
    for lin in CONFIGS:
        if "-linear-" in lin.name and "-spherical-linear-" not in lin.name:
            pairs.append((lin, lin.with_name(lin.name.replace("-linear-", "-spherical-"))))
    return pairs


def test_grid_is_complete() -> None:
    names = {p.stem for p in CONFIGS}
    # The paper's grid (issue 6): tokenizer x scale with its patch size, 80 epochs, plus the 200-epoch FLUX.2 B/2 pair.
    required = [
        "flux2-B2-{}-80ep",
        "flux2-XL2-{}-80ep",
        "vavae-B1-{}-80ep",
        "vavae-XL1-{}-80ep",
        "repae-flux1-B2-{}-80ep",
        "sdvae-B2-{}-80ep",
        "flux2-B2-{}-200ep",
    ]
    for pattern in required:
        for mode in ("linear", "spherical"):
            assert pattern.format(mode) in names
    # plus the ablation's two middle arms beside the FLUX.2 B/2 80-epoch pair
    assert set(ABLATION) <= names
    assert len(_pairs()) * 2 + 2 == len(CONFIGS)


def test_ablation_arms_are_the_paper_presets_and_differ_only_in_the_method() -> None:
    """The paper's four-arm ablation (FLUX.2, SiT-B/2, 80 epochs): one preset per arm, nothing else differs, and
    every spherical-latent arm decodes with the finetuned decoder."""
    cfgs = [load_image_config(EXP / "configs" / f"{name}.yaml") for name in ABLATION]
    assert [c.flow.preset for c in cfgs] == ["linear", "shell", "spherical-linear", "spherical"]
    flat = [_flatten(to_dict(c)) for c in cfgs]
    for other in flat[1:]:
        assert {k for k in flat[0] if flat[0][k] != other[k]} <= METHOD_KEYS
    assert [c.tokenizer.decoder_state is not None for c in cfgs] == [False, False, True, True]
    assert [c.flow.resolved["path"] for c in cfgs] == ["linear", "shell", "linear", "geodesic"]


def test_committed_configs_match_generator(tmp_path: Path) -> None:
    gen = _load_script("make_configs")
    assert gen.main(["--out", str(tmp_path)]) == 0
    written = {p.name: p.read_text() for p in tmp_path.glob("*.yaml")}
    committed = {p.name: p.read_text() for p in CONFIGS}
    assert written == committed, "run experiments/imagenet_sfm/scripts/make_configs.py and commit the result"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_strictly(path: Path) -> None:
    cfg = load_image_config(path)
    assert isinstance(cfg, ImageRunConfig) and cfg.kind == "image"
    # Through the generic loader as well, and every key in the file is one the schema knows (nothing ignored).
    assert to_dict(load_config(ImageRunConfig, path)) == to_dict(cfg)
    raw = _flatten(yaml.safe_load(path.read_text()))
    assert set(raw) <= set(_flatten(to_dict(cfg)))
    assert cfg.name == path.stem


def test_strict_loader_rejects_a_typo_in_a_grid_config(tmp_path: Path) -> None:
    data = yaml.safe_load(CONFIGS[0].read_text())
    data["train"]["ema_decy"] = 0.9999
    with pytest.raises(ConfigError, match=r"train\.ema_decy"):
        load_image_config(data)


@pytest.mark.parametrize("lin,sph", _pairs(), ids=[p[0].stem.replace("-linear", "") for p in _pairs()])
def test_pair_differs_only_in_method_keys(lin: Path, sph: Path) -> None:
    a = _flatten(to_dict(load_image_config(lin)))
    b = _flatten(to_dict(load_image_config(sph)))
    assert set(a) == set(b)
    differing = {k for k in a if a[k] != b[k]}
    assert differing <= METHOD_KEYS, f"{lin.name} vs {sph.name} also differ in {sorted(differing - METHOD_KEYS)}"
    assert (a["flow.path"], b["flow.path"]) == ("linear", "geodesic")
    assert {k for k in a if a[k] != b[k]} >= FLOW_KEYS - {"flow.path"}  # every setting written out, not defaulted
    assert (load_image_config(lin).flow.preset, load_image_config(sph).flow.preset) == ("linear", "spherical")
    # The linear baseline decodes with the tokenizer's own decoder; spherical with the finetuned one, trained on the
    # projected tokens of the same tokenizer; one cache serves both.
    assert a["tokenizer.decoder_state"] is None and b["tokenizer.decoder_state"] is not None
    assert b["data.latents"] == a["data.latents"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_paper_hyperparameters(path: Path) -> None:
    cfg = load_image_config(path)
    epochs = int(path.stem.rsplit("-", 1)[1].removesuffix("ep"))
    assert cfg.train.batch_size == 256
    # steps x batch covers exactly `epochs` passes over ImageNet-1k train (last batch of an epoch partial).
    assert cfg.train.steps == epochs * math.ceil(IMAGENET_TRAIN_IMAGES / 256)
    assert abs(cfg.train.steps * 256 / IMAGENET_TRAIN_IMAGES - epochs) < 0.01 * epochs
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.optim.weight_decay == 0.0  # AdamW, as SiT
    assert cfg.optim.warmup_steps == 0
    assert cfg.train.ema_decay == pytest.approx(0.9999) and cfg.train.ema_warmup == 0
    assert cfg.train.class_dropout == pytest.approx(0.1)
    assert cfg.train.mixed_precision == "bf16"
    assert cfg.flow.time == "uniform" and cfg.flow.time_shift == 1.0
    assert cfg.data.source == "latents" and cfg.tokenizer.kind == "diffusers"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_tokenizer_and_patch_size_match_the_paper(path: Path) -> None:
    cfg = load_image_config(path)
    tok, model = path.stem.split("-B")[0].split("-XL")[0], cfg.model.arch
    expected = {"flux2": ("flux2", 2), "vavae": ("kl", 1), "repae-flux1": ("kl", 2), "sdvae": ("kl", 2)}[tok]
    assert cfg.tokenizer.vae_kind == expected[0]
    assert model.endswith(f"/{expected[1]}") and model.split("-")[1].split("/")[0] in ("B", "XL")


def _readme_commands() -> list[list[str]]:
    """Every command of the README's bash blocks, continuation lines joined, ``$E`` expanded, env prefixes dropped."""
    text = (EXP / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            words = shlex.split(line.replace("$E", str(EXP)))
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words.pop(0)
            commands.append(words)
    return commands


def test_readme_commands_match_the_cli_and_scripts() -> None:
    """The recipe's commands parse: CLI options exist, script flags exist, configs named by train.sh exist."""
    import click
    from accelerate.commands import launch  # its argument parser only: nothing is launched

    from manifold_fm.cli import main

    seen = set()
    for words in _readme_commands():
        if words[:2] == ["accelerate", "launch"]:  # the launcher's flags parse, and it runs the CLI module
            launcher = launch.launch_command_parser().parse_args(words[2:])
            assert launcher.module and launcher.training_script == "manifold_fm.cli", words
            words = ["manifold-fm", *launcher.training_script_args]
            seen.add("accelerate launch")
        if words[0] == "manifold-fm":
            ctx = click.Context(main)
            command = main.get_command(ctx, words[1])
            assert command is not None, words
            command.make_context(words[1], words[2:])  # raises on an unknown option or a bad value
            seen.add(words[1])
        elif words[0] == "python" and words[1].endswith(".py"):
            module = _load_script(Path(words[1]).stem)
            module.build_parser().parse_args(words[2:])
            seen.add(Path(words[1]).stem)
        elif words[0] == "bash" and words[1].endswith("train.sh"):
            assert (EXP / "configs" / f"{words[2]}.yaml").is_file(), words
            seen.add("train.sh")
        elif words[0] == "bash":
            assert Path(words[1]).is_file(), words
            seen.add(Path(words[1]).name)
        elif words[0] != "mv":
            raise AssertionError(f"unexpected README command {words}")
    assert {
        "finetune-decoder",
        "extract-latents",
        "prepare_imagenet",
        "latent_stats",
        "train.sh",
        "sample_eval.sh",
        "gpu_check.sh",
        "accelerate launch",
    } <= seen


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_a_crash_loses_at_most_an_epoch_and_every_tenth_epoch_is_kept(path: Path) -> None:
    cfg = load_image_config(path)
    epoch = math.ceil(IMAGENET_TRAIN_IMAGES / 256)
    assert cfg.train.checkpoint_every == epoch
    assert cfg.train.keep_every == 10 * epoch and cfg.train.steps % cfg.train.keep_every == 0
    assert cfg.train.keep_checkpoints == 1  # the newest, besides the kept multiples
