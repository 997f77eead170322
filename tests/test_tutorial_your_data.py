"""docs/tutorials/your-data.md runs as written: its ```bash commands (``manifold-fm ...``) on a small synthetic
lat/lon CSV, in order, with tiny step counts added to ``train``; then its ```python blocks."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from manifold_fm.cli import main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "your-data.md"
TINY = [
    "--steps", "6", "--set", "model.hidden=16", "--set", "train.batch_size=32", "--set", "eval.val_every=2",
    "--set", "eval.val_steps=2", "--set", "eval.likelihood_steps=2", "--set", "eval.check_steps=3",
    "--set", "sample.steps=2", "--set", "eval.plot_samples=50", "--no-progress",
]  # fmt: skip


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)


def test_the_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    lat, lon = 20 + 10 * torch.randn(120, generator=g), 100 + 20 * torch.randn(120, generator=g)
    rows = "\n".join(f"{a:.3f},{b:.3f}" for a, b in zip(lat, lon, strict=True))
    Path("points.csv").write_text(f"# my points\nlat,lon\n{rows}\n")
    commands = [line for block in _blocks("bash") for line in block.splitlines() if line.startswith("manifold-fm ")]
    assert [c.split()[1] for c in commands] == ["train", "compare", "evaluate", "sample", "export"]
    runner = CliRunner()
    for line in commands:
        args = shlex.split(line)[1:]
        res = runner.invoke(main, args + (TINY if args[0] == "train" else []))
        assert res.exit_code == 0, f"{line}\n{res.output}"
    assert Path("runs/mine/best.json").is_file() and Path("runs/mine/samples/samples.png").is_file()
    namespace: dict[str, object] = {"__name__": "tutorial_your_data"}
    for code in _blocks("python"):
        exec(compile(code, "your-data.md", "exec"), namespace)
