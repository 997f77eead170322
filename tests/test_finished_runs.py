"""Runs a user has are never lost or silently rewritten: `train --resume` on a finished run (image, toy, decoder
finetune) says so and changes nothing, `--resume` into a folder without a run is an error, a run's length changes
only with --extend (a constant schedule extends exactly like a longer run), `sample --out` keeps what a folder
holds unless --overwrite, --checkpoint picks a kept checkpoint, --no-ema never reads the EMA file. (The default
run's own checks: tests/test_default_run.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from manifold_fm.cli import main
from manifold_fm.training.checkpoint import load_checkpoint

from helpers import tiny_image_run

IMAGE = tiny_image_run("train.checkpoint_every=1", "train.keep_checkpoints=null", "sample.steps=2")
TOY = ["train.steps=2", "model.hidden=8", "train.batch_size=8", "eval.test_samples=4", "eval.plot_samples=8"]
TOY += ["eval.likelihood_steps=1", "sample.steps=1", "train.threads=1"]


def _invoke(*args: str | Path) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _files(folder: Path) -> dict[Path, int]:
    """Every file under ``folder`` with its modification time (ns): what a rewrite changes."""
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image run of 2 steps with both checkpoints kept."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = _invoke("train", *IMAGE, "--steps", "2", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_resume_on_a_finished_image_run_changes_nothing(run: Path) -> None:
    before = _files(run)
    again = _invoke("train", "--resume", "--out", run)  # its own config.yaml: no --config needed
    assert again.exit_code == 0, again.output
    assert again.output == (
        f"{run} holds a finished image run (2 steps), recorded in checkpoints/step_00000002; nothing to do (train "
        "it longer with --resume --extend --steps N, or start again with --overwrite)\n"
    )
    assert _files(run) == before


def test_resume_into_a_folder_without_a_run_is_an_error(tmp_path: Path) -> None:
    for args in (["--config", "image-builtin"], []):  # an image run, the default run
        result = _invoke("train", *args, "--resume", "--out", tmp_path / "nothing")
        assert result.exit_code == 1 and result.output == (
            f"Error: --resume: {tmp_path / 'nothing'} holds no run to continue (no config.yaml or checkpoints/); "
            "run without --resume to start one\n"
        )
        assert not (tmp_path / "nothing").exists()


def test_a_constant_schedule_extends_exactly_like_a_longer_run(run: Path, tmp_path: Path) -> None:
    """--extend continues the stream: with a constant learning rate the extended run equals one trained for the new
    length from the start; without --extend the length is not changed."""
    part = tmp_path / "part"
    shutil.copytree(run, part)
    refused = _invoke("train", "--resume", "--out", part, "--steps", "4")
    assert refused.exit_code == 1 and "was set for 2 steps, not 4; pass --extend" in refused.output
    extended = _invoke("train", "--resume", "--out", part, "--steps", "4", "--extend")
    assert extended.exit_code == 0, extended.output
    assert "extending" in extended.output and "from 2 to 4 steps" in extended.output
    whole = _invoke("train", *IMAGE, "--steps", "4", "--out", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    a, b = load_checkpoint(part / "checkpoints"), load_checkpoint(tmp_path / "whole" / "checkpoints")
    assert a.step == b.step == 4 and a.meta["sessions"] == [{"start": 0, "steps": 2}, {"start": 2, "steps": 2}]
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    shorter = _invoke("train", "--resume", "--out", part, "--steps", "3", "--extend")
    assert shorter.exit_code == 1 and "is at step 4, beyond 3" in shorter.output


def test_a_finished_toy_run_is_not_evaluated_again(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    args = ["train", "--config", "toy-sphere", "--out", out, *[a for kv in TOY for a in ("--set", kv)]]
    assert _invoke(*args).exit_code == 0
    before = _files(out)
    again = _invoke(*args, "--resume")
    assert again.exit_code == 0 and "holds a finished toy run (2 steps), recorded in metrics.json" in again.output
    assert _files(out) == before


def test_a_finished_finetune_is_not_rewritten(tmp_path: Path) -> None:
    out = tmp_path / "ft"
    base = ["finetune-decoder", "--per-class", "1", "--steps", "2", "--batch-size", "4", "--eval-items", "4"]
    first = _invoke(*base, "--gan-start", "0", "--discriminator", "patch", "--threads", "1", "--out", out)
    assert first.exit_code == 0, first.output
    before = _files(out)
    again = _invoke(*base, "--gan-start", "0", "--discriminator", "patch", "--threads", "1", "--out", out, "--resume")
    assert again.exit_code == 0, again.output
    assert again.output.startswith(
        f"{out} holds a finished decoder finetune (2 steps), recorded in decoder.safetensors"
    )
    assert "reconstruction" in again.output  # its saved report is printed
    by_train = _invoke("train", "--resume", "--out", out)
    assert by_train.exit_code == 0 and "holds a finished decoder finetune" in by_train.output
    assert _files(out) == before


def test_sample_keeps_an_existing_out_unless_overwrite(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    args = ["sample", run, "--num", "4", "--steps", "1", "--out", out]
    assert _invoke(*args).exit_code == 0
    before = _files(out)
    refused = _invoke(*args, "--seed", "1")
    assert refused.exit_code == 1 and refused.output == (
        f"Error: --out {out} already holds samples (sample_info.json); pass --overwrite to replace them\n"
    )
    assert _files(out) == before
    replaced = _invoke(*args, "--seed", "1", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "sample_info.json").read_text())["seed"] == 1
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    foreign = _invoke("sample", run, "--num", "4", "--out", other, "--overwrite")
    assert foreign.exit_code == 1 and "holds files that are not samples" in foreign.output
    assert (other / "notes.txt").read_text() == "mine"


def test_checkpoint_picks_a_kept_checkpoint_for_sample_and_export(run: Path, tmp_path: Path) -> None:
    common = ["--num", "4", "--steps", "1", "--no-grid"]
    assert _invoke("sample", run, *common, "--checkpoint", "1", "--out", tmp_path / "one").exit_code == 0
    assert _invoke("sample", run, *common, "--out", tmp_path / "two").exit_code == 0
    assert json.loads((tmp_path / "one" / "sample_info.json").read_text())["step"] == 1
    with np.load(tmp_path / "one" / "samples.npz") as a, np.load(tmp_path / "two" / "samples.npz") as b:
        assert not np.array_equal(a["arr_0"], b["arr_0"])  # other weights
    exported = _invoke("export", run, "--checkpoint", "1", "--out", tmp_path / "exp")
    assert exported.exit_code == 0, exported.output
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["step"] == 1
    missing = _invoke("sample", run, *common, "--checkpoint", "7", "--out", tmp_path / "x")
    assert missing.exit_code == 1 and missing.output == (
        f"Error: --checkpoint 7: {run / 'checkpoints'} keeps no checkpoint of step 7 (kept: 1, 2)\n"
    )


def test_no_ema_never_reads_the_ema_file(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ema = copy / "checkpoints" / "step_00000002" / "ema.safetensors"
    ema.write_bytes(b"damaged")
    common = ["--num", "4", "--steps", "1", "--no-grid"]
    raw = _invoke("sample", copy, *common, "--no-ema", "--out", tmp_path / "raw")
    assert raw.exit_code == 0, raw.output
    intact = _invoke("sample", run, *common, "--no-ema", "--out", tmp_path / "intact")
    assert intact.exit_code == 0, intact.output
    with np.load(tmp_path / "raw" / "samples.npz") as a, np.load(tmp_path / "intact" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    assert _invoke("export", copy, "--no-ema", "--out", tmp_path / "exp").exit_code == 0
    averaged = _invoke("sample", copy, *common, "--out", tmp_path / "ema")
    assert averaged.exit_code == 1 and averaged.output.startswith(f"Error: checkpoint file {ema} is unreadable (")
    assert averaged.output.rstrip().endswith(
        "; --no-ema reads the raw weights without it; choose another with --checkpoint STEP (kept: 1)"
    )
