"""``manifold-fm train`` from the command line: toy runs, dispatch, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from manifold_fm.cli import main

TINY = [
    "--set",
    "train.steps=6",
    "--set",
    "model.hidden=16",
    "--set",
    "train.batch_size=32",
    "--set",
    "eval.test_samples=20",
    "--set",
    "eval.likelihood_steps=2",
    "--set",
    "sample.steps=2",
    "--set",
    "eval.plot_samples=50",
]


def test_train_toy_sphere_geodesic_and_linear(tmp_path: Path) -> None:
    runner = CliRunner()
    for path in ("geodesic", "linear"):
        out = tmp_path / path
        res = runner.invoke(main, ["train", "--config", "toy-sphere", "--path", path, "--out", str(out), *TINY])
        assert res.exit_code == 0, res.output
        assert f"run folder: {out}" in res.output
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["path"] == path and metrics["train_steps"] == 6
        assert (out / "samples.png").stat().st_size > 1000
        assert (out / "checkpoints" / "latest").is_file()
    # an existing run is not overwritten without --resume; a longer run is asked for explicitly (--extend), and
    # toy-sphere's cosine schedule, a function of train.steps, changes only with --reschedule too
    res = runner.invoke(main, ["train", "--config", "toy-sphere", "--out", str(tmp_path / "geodesic"), *TINY])
    assert res.exit_code == 1 and "already holds a run" in res.output and "Traceback" not in res.output
    longer = ["train", "--config", "toy-sphere", "--out", str(tmp_path / "geodesic"), "--resume", *TINY, "--steps", "8"]
    res = runner.invoke(main, longer)
    assert res.exit_code == 1 and "was set for 6 steps, not 8; pass --extend" in res.output
    res = runner.invoke(main, [*longer, "--extend"])
    assert res.exit_code == 1 and "cosine" in res.output and "--reschedule" in res.output
    assert json.loads((tmp_path / "geodesic" / "metrics.json").read_text())["train_steps"] == 6  # untouched
    res = runner.invoke(main, [*longer, "--extend", "--reschedule"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "geodesic" / "metrics.json").read_text())["train_steps"] == 8
    # a corrupt checkpoint is a one-line error, and nothing already written is lost
    latest = tmp_path / "geodesic" / "checkpoints" / "step_00000008" / "model.safetensors"
    latest.write_bytes(b"not a safetensors file")
    res = runner.invoke(
        main,
        [
            *("train", "--config", "toy-sphere", "--out", str(tmp_path / "geodesic"), "--resume", *TINY),
            *("--steps", "10", "--extend", "--reschedule"),
        ],
    )
    assert res.exit_code == 1 and "unreadable" in res.output and "Traceback" not in res.output
    assert (tmp_path / "geodesic" / "metrics.json").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config", "toy-sphere", "--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
        (["--config", "toy-sphree"], "did you mean 'toy-sphere'"),
        (["--config", "toy-sphere", "--set", "data.name=moons"], "unknown toy dataset 'moons'"),
        (["--config", "toy-sphere", "--set", "flow.path=curved"], "flow.path: 'curved' is not one of"),
        (["--config", "toy-sphere", "--set", "path=linear"], "unknown config key 'path'"),
    ],
)
def test_bad_configs_are_one_line_errors(args: list[str], message: str, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["train", *args, "--out", str(tmp_path / "x")])
    assert res.exit_code != 0
    assert message in res.output and "Traceback" not in res.output


def test_unknown_kind_and_dispatch_by_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "weird.yaml"
    cfg.write_text("kind: audio\n")
    res = CliRunner().invoke(main, ["train", "--config", str(cfg)])
    assert res.exit_code == 1 and "kind: 'audio' is not one of 'manifold', 'toy', 'image', 'default'" in res.output
    calls = []

    def fake(name):  # noqa: ANN001, ANN202
        def run(cfg, out_dir=None, resume=False, overwrite=False, **options):  # noqa: ANN001, ANN003, ANN202
            calls.append((name, type(cfg).__name__, cfg.train.steps, out_dir, overwrite))
            return Path(f"runs/{name}")

        return run

    import manifold_fm.training.default_run as default_run
    import manifold_fm.training.image as image

    monkeypatch.setattr(default_run, "run_default", fake("default"))
    monkeypatch.setattr(image, "train_image", fake("image"))
    res = CliRunner().invoke(main, ["train", "--steps", "3", "--out", str(tmp_path / "d")])
    assert res.exit_code == 0 and "runs/default" in res.output, res.output
    image_cfg = tmp_path / "img.yaml"
    image_cfg.write_text("kind: image\n")
    res = CliRunner().invoke(main, ["train", "--config", str(image_cfg), "--path", "linear", "--overwrite"])
    assert res.exit_code == 0 and "runs/image" in res.output, res.output
    assert calls == [
        ("default", "DefaultRunConfig", 3, tmp_path / "d", False),
        ("image", "ImageRunConfig", 1000, None, True),
    ]
