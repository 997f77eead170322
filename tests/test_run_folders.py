"""Run folders: `train --overwrite` replaces a run of any kind (only after the new config validates, never with
--resume, never a folder that holds no run); a default run records its decoder relative to the run folder, so a
moved folder samples the same images; `sample` on a default run's folder samples each of its modes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from manifold_fm.cli import main
from manifold_fm.errors import InputError
from manifold_fm.training.run_folder import (
    OVERWRITE_AND_RESUME,
    recorded_path,
    replace_run_folder,
    resolve_recorded_path,
)

TOY = ["train.steps=2", "model.hidden=8", "train.batch_size=8", "eval.test_samples=4", "eval.plot_samples=8"]
TOY += ["eval.likelihood_steps=1", "sample.steps=1"]
IMAGE = ["train.steps=2", "data.per_class=2", "train.batch_size=8", "train.sample_every=null", "sample.steps=2"]
DEFAULT = [
    "data.per_class=3",
    "data.test_per_class=2",
    "finetune.steps=2",
    "finetune.batch_size=4",
    "train.steps=2",
    "train.batch_size=12",
    "eval.num_samples=24",
    "train.eval_every=null",
    "sample.steps=2",
    "train.threads=1",
    "parallel=false",
]


def _sets(items: list[str]) -> list[str]:
    return [a for kv in items for a in ("--set", kv)]


def _train(config: str, out: Path, items: list[str], *extra: str) -> object:
    return CliRunner().invoke(main, ["train", "--config", config, "--out", str(out), *_sets(items), *extra])


@pytest.mark.parametrize(("config", "items"), [("toy-sphere", TOY), ("image-builtin", IMAGE)])
def test_overwrite_replaces_a_toy_or_image_run(tmp_path: Path, config: str, items: list[str]) -> None:
    out = tmp_path / "run"
    assert _train(config, out, items).exit_code == 0
    marker = out / "notes.txt"
    marker.write_text("from the first run")
    refused = _train(config, out, items)
    assert refused.exit_code == 1 and "--overwrite to replace it" in refused.output
    # a bad config is reported before anything is deleted
    bad = _train(config, out, [*items, "train.stepz=3"], "--overwrite")
    assert bad.exit_code == 1 and "train.stepz" in bad.output and marker.is_file()
    both = _train(config, out, items, "--overwrite", "--resume")
    assert both.exit_code == 2 and OVERWRITE_AND_RESUME in both.output and marker.is_file()
    again = _train(config, out, items, "--overwrite")
    assert again.exit_code == 0, again.output
    assert not marker.exists() and (out / "checkpoints" / "latest").is_file()
    steps = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert steps == ["step_00000002"]


def test_overwrite_refuses_what_is_not_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("keep me")
    result = _train("toy-sphere", folder, TOY, "--overwrite")
    assert result.exit_code == 1 and "holds no run" in result.output and "Traceback" not in result.output
    assert (folder / "thesis.tex").read_text() == "keep me"
    (folder / "config.yaml").write_text("kind: toy\n")
    monkeypatch.chdir(folder)
    with pytest.raises(InputError, match="holds the working directory"):
        replace_run_folder(folder)
    with pytest.raises(InputError, match="exclude each other"):
        replace_run_folder(tmp_path / "absent", resume=True)
    replace_run_folder(tmp_path / "absent")  # nothing there: nothing to do


def test_recorded_paths_are_relative_to_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "decoders").mkdir()
    (tmp_path / "decoders" / "d.safetensors").write_bytes(b"")
    run = tmp_path / "runs" / "a"
    assert recorded_path(Path("decoders/d.safetensors"), run) == Path("../../decoders/d.safetensors")
    assert recorded_path(Path("/abs/d.safetensors"), run) == Path("/abs/d.safetensors")
    assert recorded_path(None, run) is None
    assert resolve_recorded_path(Path("../../decoders/d.safetensors"), run) == run / "../../decoders/d.safetensors"
    # a run written before paths were recorded this way: relative to the working directory
    assert resolve_recorded_path(Path("decoders/d.safetensors"), run) == Path("decoders/d.safetensors")


def test_a_moved_default_run_samples_the_same_images_and_can_be_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "default"
    items = [*DEFAULT, f"tokenizer.cache_dir={tmp_path / 'cache'}"]
    trained = CliRunner().invoke(main, ["train", "--out", str(out), *_sets(items)])
    assert trained.exit_code == 0, trained.output
    meta = json.loads(next((out / "spherical" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["config"]["tokenizer"]["decoder_state"] == "../spherical_decoder.safetensors"

    # the default run's folder: every mode is sampled, into its own folder, and the command says where
    whole = CliRunner().invoke(main, ["sample", str(out), "--num", "4", "--steps", "2"])
    assert whole.exit_code == 0, whole.output
    lines = whole.stdout.splitlines()  # progress bars go to stderr
    assert [line.split(":")[0] for line in lines] == ["spherical", "linear"]
    for mode in ("spherical", "linear"):
        assert (out / mode / "samples-00000002" / "samples.npz").is_file()
        assert (out / mode / "samples-00000002" / "grid.png").is_file()

    args = ["--num", "4", "--steps", "2", "--no-grid"]
    before = CliRunner().invoke(main, ["sample", str(out / "spherical"), "--out", str(tmp_path / "before"), *args])
    assert before.exit_code == 0, before.output
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    after = CliRunner().invoke(main, ["sample", str(moved / "spherical"), "--out", str(tmp_path / "after"), *args])
    assert after.exit_code == 0, after.output
    with np.load(tmp_path / "before" / "samples.npz") as a, np.load(tmp_path / "after" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])

    # --overwrite replaces the default run (after its config validated); without it the folder is refused
    refused = CliRunner().invoke(main, ["train", "--out", str(moved), *_sets(items)])
    assert refused.exit_code == 1 and "--overwrite to replace it" in refused.output
    (moved / "notes.txt").write_text("from the first run")
    replaced = CliRunner().invoke(
        main, ["train", "--out", str(moved), *_sets([*items, "modes=[linear]"]), "--overwrite"]
    )
    assert replaced.exit_code == 0, replaced.output
    assert not (moved / "notes.txt").exists() and not (moved / "spherical").exists()
    assert list(json.loads((moved / "results.json").read_text())["modes"]) == ["linear"]


def test_sampling_a_default_run_without_checkpoints_says_how_to_finish_it(tmp_path: Path) -> None:
    folder = tmp_path / "default"
    folder.mkdir()
    (folder / "config.yaml").write_text("kind: default\nmodes: [spherical, linear]\n")
    result = CliRunner().invoke(main, ["sample", str(folder)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == (
        f"Error: {folder} is a default run whose modes (spherical, linear) hold no checkpoint yet; "
        f"finish it with manifold-fm train --out {folder} --resume"
    )
