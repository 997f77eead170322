"""Metrics over training and steps-to-threshold: image runs evaluate during training with fixed noise; a command
plots a metric against steps for several runs and reports the steps each needs to reach a threshold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from manifold_fm.cli import main
from manifold_fm.config import ConfigError
from manifold_fm.eval.over_training import steps_to_threshold
from manifold_fm.training.schema import load_image_config


def test_steps_to_threshold_reads_the_first_evaluation_that_reaches_it() -> None:
    curve = [(100, 50.0), (200, 40.0), (300, 20.0), (400, 25.0), (500, 10.0)]
    assert steps_to_threshold(curve, 30.0) == 300.0  # evaluated there, not guessed between 200 and 300
    assert steps_to_threshold(curve, 30.0, interpolate=True) == pytest.approx(250.0)  # halfway: 40 @ 200, 20 @ 300
    assert steps_to_threshold(curve, 40.0) == steps_to_threshold(curve, 40.0, interpolate=True) == 200.0
    assert steps_to_threshold(curve, 60.0) == 100.0  # already there at the first evaluation
    assert steps_to_threshold(curve, 5.0) is None
    assert steps_to_threshold(curve, 22.0) == 300.0  # the first crossing, not the later one
    assert steps_to_threshold(curve, 22.0, interpolate=True) == pytest.approx(290.0)


def test_image_runs_evaluate_during_training_and_compare(tmp_path: Path) -> None:
    runner = CliRunner()
    base = [
        "train",
        "--config",
        "image-builtin",
        "--steps",
        "4",
        "--set",
        "data.per_class=2",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.sample_every=null",
        "--set",
        "train.eval_every=2",
        "--set",
        "eval.samples=12",
        "--set",
        "sample.steps=2",
        "--set",
        f"tokenizer.cache_dir={tmp_path / 'cache'}",
    ]
    for path in ("linear", "geodesic"):
        result = runner.invoke(main, [*base, "--path", path, "--out", str(tmp_path / path)])
        assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "geodesic" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "fd_builtin_classifier" in r] == [2, 4]
    # the fixed evaluation noise: re-evaluating the final EMA model reproduces the logged value
    out = tmp_path / "cmp"
    result = runner.invoke(
        main, ["compare", f"linear={tmp_path / 'linear'}", f"spherical={tmp_path / 'geodesic'}", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "comparison.json").read_text())
    lin = report["curves"]["linear"]
    assert report["reference_run"] == "linear" and report["threshold"] == lin[-1][1]
    assert report["steps_to_threshold"]["linear"] <= 4 and report["speedup_over_reference"]["linear"] == 1.0
    assert (out / "comparison.png").stat().st_size > 1000 and "speedup" in result.output
    missing = runner.invoke(main, ["compare", str(tmp_path / "linear"), "--metric", "fid"])
    assert missing.exit_code != 0 and "logged no 'fid'" in missing.output


def test_fid_during_training_on_a_cache_needs_its_inputs() -> None:
    with pytest.raises(ConfigError, match="eval.inception_weights: FID during training on a latent cache"):
        load_image_config("image-builtin", ["data.source=latents", "data.latents=x", "train.eval_every=10"])
