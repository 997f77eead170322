"""The built-in default run (``manifold-fm train`` with no config), shrunk with ``--set`` to a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from manifold_fm.cli import main
from manifold_fm.config import ConfigError
from manifold_fm.training.default_report import format_table
from manifold_fm.training.schema import load_run_config

from helpers import assert_resumed, log_lines


def _files(folder: Path) -> dict[Path, int]:
    """Every file under ``folder`` with its modification time (ns): what a rewrite would change."""
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


SHRINK = [
    "data.per_class=3",
    "data.test_per_class=2",
    "finetune.steps=2",
    "finetune.batch_size=4",
    "train.steps=4",
    "train.batch_size=12",
    "eval.num_samples=24",
    "train.eval_every=2",
    "eval.samples=12",
    "sample.steps=2",
    "train.threads=1",
]


def test_default_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "default"
    args = ["train", "--out", str(out)]
    for item in [*SHRINK, f"tokenizer.cache_dir={tmp_path / 'cache'}"]:
        args += ["--set", item]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "FD-builtin-classifier" in result.output and "spherical" in result.output and "linear" in result.output
    results = json.loads((out / "results.json").read_text())
    sph, lin = results["modes"]["spherical"], results["modes"]["linear"]
    assert sph["on_sphere_error_max"] < 1e-5  # exp-map sampling keeps every token on its sphere
    assert lin["on_sphere_error_max"] > 1e-3  # the linear baseline's tokens are not constrained
    for r in (sph, lin):
        assert r["fd_builtin_classifier"] >= 0 and 0 <= r["classifier_accuracy"] <= 1 and r["steps"] == 4
    assert set(results["references"]) >= {
        "real held-out images",
        "reconstructions (base decoder)",
        "reconstructions (spherical, finetuned decoder)",
    }
    for f in [
        "spherical/grid.png",
        "linear/grid.png",
        "metrics_over_steps.png",
        "reconstructions.png",
        "results.md",
        "spherical_decoder.safetensors",
        "config.yaml",
    ]:
        assert (out / f).is_file(), f
    # Pictures name their rows and runs; the table says what each column means.
    from PIL import Image

    from manifold_fm.data.builtin_images import CLASS_NAMES
    from manifold_fm.training.default_report import LEGEND

    recon = Image.open(out / "reconstructions.png").text
    assert recon["Row labels"].splitlines() == [
        "held-out images",
        "base decoder",
        "spherical, finetuned decoder",
        "spherical, base decoder",
    ]
    for mode in ("spherical", "linear"):
        grid = Image.open(out / mode / "grid.png").text
        assert grid["Title"] == f"{mode} (default run, 4 steps, EMA weights)"
        assert grid["Row labels"].splitlines() == list(CLASS_NAMES)
    assert LEGEND in result.output and LEGEND in (out / "results.md").read_text()
    assert "on-sphere error (max)" in LEGEND and "In parentheses for modes that do not project" in LEGEND
    assert (out / "results.md").read_text().endswith("(1 thread).\n")
    # Metrics over steps: an evaluation at step 2 was logged for each mode.
    for mode in ("spherical", "linear"):
        steps = [
            json.loads(line)["step"]
            for line in (out / mode / "metrics.jsonl").read_text().splitlines()
            if "fd_builtin_classifier" in line
        ]
        assert steps == [2]
    # the modes are image runs: `sample` loads them; a second run into the same folder is refused, nothing touched
    before = _files(out)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "already holds a default run" in again.output
    # --resume on the finished run says so in one line and rewrites nothing (no retraining, no new results)
    again = CliRunner().invoke(main, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert again.output.splitlines() == [
        f"{out} holds a finished default run (4 steps), recorded in results.json; nothing to do (train it longer "
        "with --resume --extend --steps N, or start again with --overwrite)"
    ]
    # a longer run is asked for explicitly (the default schedule is constant, so --extend alone does it)
    longer = CliRunner().invoke(main, [*args, "--resume", "--steps", "6"])
    assert longer.exit_code == 1 and "was set for 4 steps, not 6; pass --extend" in longer.output
    assert _files(out) == before
    # export, compare and evaluate take the default run's folder too: its modes, or a pointer to their samples
    exported = CliRunner().invoke(main, ["export", str(out), "--out", str(tmp_path / "exported")])
    assert exported.exit_code == 0, exported.output
    for mode in ("spherical", "linear"):
        assert json.loads((tmp_path / "exported" / mode / "config.json").read_text())["flow"] == mode
    compared = CliRunner().invoke(main, ["compare", str(out), "--out", str(tmp_path / "cmp")])
    assert compared.exit_code == 0, compared.output
    report = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    for mode in ("spherical", "linear"):  # the evaluation during training, then the table's final one
        logged = [json.loads(line) for line in log_lines(out / mode)]
        during = [r["fd_builtin_classifier"] for r in logged if "fd_builtin_classifier" in r]
        final = results["modes"][mode]["fd_builtin_classifier"]
        assert report["curves"][mode] == [[2, during[0]], [4, final]]
    assert report["threshold"] == results["modes"]["spherical"]["fd_builtin_classifier"]
    evaluated = CliRunner().invoke(main, ["evaluate", str(out)])
    assert evaluated.exit_code == 1 and evaluated.output.startswith(
        f"Error: {out} is a run folder, not samples; sample it first"
    )


def test_default_overrides_and_errors(tmp_path: Path) -> None:
    cfg = load_run_config("default", ["train.steps=9", "modes=[linear]", "optim.lr=1"])
    assert cfg.train.steps == 9 and cfg.modes == ["linear"] and cfg.optim.lr == 1
    with pytest.raises(ConfigError, match="modes"):
        load_run_config("default", ["modes=[slerp]"])
    result = CliRunner().invoke(main, ["train", "--set", "stepz=3"])
    assert result.exit_code != 0 and "unknown config key 'stepz'" in result.output
    result = CliRunner().invoke(main, ["train", "--set", "train.stepz=3"])
    assert result.exit_code != 0 and "unknown config key 'train.stepz' (did you mean 'train.steps'?)" in result.output
    result = CliRunner().invoke(main, ["train", "--resume", "--out", str(tmp_path / "none")])
    assert result.exit_code == 1 and "holds no run to continue" in result.output


def test_format_table_rows() -> None:
    row = {
        "fd_builtin_classifier": 1.5,
        "classifier_accuracy": 0.5,
        "on_sphere_error_max": 1e-7,
        "train_s": 10,
        "sample_s_per_image": 0.002,
    }
    table = format_table(
        {
            "modes": {"spherical": row, "linear": {**row, "on_sphere_error_max": 0.4}},
            "references": {"real held-out images": {"fd_builtin_classifier": 0.1}},
        }
    )
    lines = table.splitlines()
    assert lines[2].startswith("| spherical | 1.500 | 0.500 | 1.0e-07 | 10 s | 2.0 ms |")
    assert "(0.40)" in lines[3] and lines[4].startswith("| real held-out images | 0.100 | - |")


def test_a_stopped_default_run_resumes_to_the_same_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bitwise resume for the default kind: one run stops in the middle of its linear mode, --resume finishes it,
    and every metric equals an uninterrupted run's (the finetuned decoder is reused, each mode resumes from its
    checkpoint)."""
    from manifold_fm.training.trainer import Trainer

    sets = [*SHRINK, "parallel=false", "train.checkpoint_every=2", f"tokenizer.cache_dir={tmp_path / 'cache'}"]
    args = [a for kv in sets for a in ("--set", kv)]
    whole = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "whole"), *args])
    assert whole.exit_code == 0, whole.output

    class Stop(Exception):
        pass

    original = Trainer.train_step

    def stop_linear_at_step_3(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if self.out_dir.name == "linear" and self.step == 3:
            raise Stop
        return original(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", stop_linear_at_step_3)
    stopped = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "part"), *args])
    assert isinstance(stopped.exception, Stop) and not (tmp_path / "part" / "results.json").exists()
    monkeypatch.setattr(Trainer, "train_step", original)
    refused = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "part"), *args])
    assert refused.exit_code == 1 and "pass --resume" in refused.output
    changed = CliRunner().invoke(
        main, ["train", "--out", str(tmp_path / "part"), *args, "--set", "optim.lr=0.5", "--resume"]
    )
    assert changed.exit_code == 1 and "optim differ" in changed.output
    part = tmp_path / "part"
    logs = {mode: log_lines(part / mode) for mode in ("spherical", "linear")}

    def finished_parts() -> dict[Path, int]:  # the decoder finetune and the spherical mode's training
        files = _files(part / "decoder_finetune") | _files(part / "spherical" / "checkpoints")
        done = ["spherical_decoder.safetensors", "spherical_decoder.json", "spherical/metrics.jsonl"]
        return files | {part / f: (part / f).stat().st_mtime_ns for f in [*done, "spherical/config.yaml"]}

    kept = finished_parts()
    resumed = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "part"), *args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    # what was finished is reused as it is: the decoder finetune (its run and decoder) and the spherical mode's
    # training (done before the stop); the linear mode continues from its step-2 checkpoint (steps 3-4 only)
    assert finished_parts() == kept
    assert_resumed(part / "linear", 2, 4, logs["linear"])
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((tmp_path / "part" / "results.json").read_text())
    for mode in ("spherical", "linear"):
        for key in ("fd_builtin_classifier", "classifier_accuracy", "on_sphere_error_max", "final_loss"):
            assert a["modes"][mode][key] == b["modes"][mode][key], (mode, key)
    assert a["references"] == b["references"] and a["finetune"] == b["finetune"]


def test_the_default_run_runs_the_four_ablation_arms(tmp_path: Path) -> None:
    """modes=[linear, shell, spherical-linear, spherical]: one image run and one table row per arm, each decoded by
    the right decoder (spherical latents by the finetuned one)."""
    out = tmp_path / "arms"
    sets = [
        *SHRINK,
        "parallel=false",
        "train.eval_every=null",
        f"tokenizer.cache_dir={tmp_path / 'cache'}",
        "modes=[linear, shell, spherical-linear, spherical]",
    ]
    result = CliRunner().invoke(main, ["train", "--out", str(out), *[a for kv in sets for a in ("--set", kv)]])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert list(results["modes"]) == ["linear", "shell", "spherical-linear", "spherical"]
    rows = [line.split("|")[1].strip() for line in (out / "results.md").read_text().splitlines()[2:6]]
    assert rows == ["linear", "shell", "spherical-linear", "spherical"]
    for arm in ("spherical-linear", "spherical"):  # samples projected onto the spheres, decoded by the finetuned one
        assert results["modes"][arm]["on_sphere_error_max"] < 1e-5
        meta = json.loads(next((out / arm / "checkpoints").glob("step_*/meta.json")).read_text())
        assert meta["config"]["tokenizer"]["decoder_state"] is not None and meta["flow"] == arm
    for arm in ("linear", "shell"):
        assert results["modes"][arm]["on_sphere_error_max"] > 1e-3


def test_quick_shrinks_every_size(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``train --quick`` is the default run with every size smaller (steps, finetune, images, samples) and nothing
    else changed; ``--set`` applies after it; it refuses another config."""
    import manifold_fm.training.default_run as default_run
    from manifold_fm.config import to_dict

    seen = []
    monkeypatch.setattr(default_run, "run_default", lambda cfg, **kw: seen.append(cfg) or tmp_path)
    result = CliRunner().invoke(main, ["train", "--quick", "--set", "train.seed=3"])
    assert result.exit_code == 0, result.output
    quick, full = to_dict(seen[0]), to_dict(load_run_config("default"))
    sizes = [
        ("train", "steps"),
        ("train", "eval_every"),
        ("data", "per_class"),
        ("data", "test_per_class"),
        ("finetune", "steps"),
        ("eval", "samples"),
        ("eval", "num_samples"),
    ]
    for section, key in sizes:
        assert quick[section][key] < full[section][key], (section, key)
        quick[section].pop(key), full[section].pop(key)
    assert (quick.pop("name"), quick["train"].pop("seed"), full["train"].pop("seed")) == ("default-quick", 3, 0)
    full.pop("name")
    assert quick == full  # the model, optimiser, flow, sampler and modes are the default run's
    other = CliRunner().invoke(main, ["train", "--quick", "--config", "toy-sphere"])
    assert other.exit_code == 2 and "--quick shrinks the built-in default run" in other.output
