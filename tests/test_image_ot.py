"""``flow.coupling: ot`` on image runs: the setting reaches the trainer (it changes the training), and a run stopped
and resumed continues exactly. (Two processes: tests/test_multiprocess.py.)"""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner

from manifold_fm.cli import main
from manifold_fm.training.checkpoint import load_checkpoint

from helpers import assert_resumed, log_lines, tiny_image_run

BASE = ["train", *tiny_image_run("train.checkpoint_every=2")]


def _train(out: Path, steps: int, *extra: str) -> dict[str, torch.Tensor]:
    result = CliRunner().invoke(main, [*BASE, *extra, "--steps", str(steps), "--out", str(out)])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out / "checkpoints")
    assert ckpt.step == steps
    return ckpt.model  # type: ignore[return-value]


def test_ot_image_run_resumes_exactly_and_differs_from_independent(tmp_path: Path) -> None:
    ot = ("--set", "flow.coupling=ot")
    full = _train(tmp_path / "full", 4, *ot)
    _train(tmp_path / "part", 2, *ot)
    before = log_lines(tmp_path / "part")
    resumed = _train(tmp_path / "part", 4, *ot, "--resume", "--extend")
    assert_resumed(tmp_path / "part", 2, 4, before)  # continued from step 2: steps 3-4 only
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    independent = _train(tmp_path / "independent", 4)
    assert any(not torch.equal(full[k], independent[k]) for k in full)
