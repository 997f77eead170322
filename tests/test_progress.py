"""How progress is shown (manifold_fm.progress): bars on a terminal, one plain line per interval when stderr is a file
or a pipe, nothing with --no-progress; one helper makes every display."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from manifold_fm.cli import main
from manifold_fm.progress import ENV, LineProgress, progress_bar, progress_mode

from helpers import tiny_image_run


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_line_progress_writes_one_plain_line_per_interval() -> None:
    now = [100.0]
    out = io.StringIO()
    bar = LineProgress(total=40, desc="train spherical", unit="step", interval=10, file=out)
    bar._time = lambda: now[0]
    bar.start_t = bar.last_print_t = now[0]
    for _ in range(35):  # one step per second
        now[0] += 1
        bar.update(1)
        if bar.n == 12:
            bar.set_postfix(loss="0.5000")
    bar.close()
    bar.close()  # once only
    assert out.getvalue().splitlines() == [
        "train spherical: 10/40 step (25%), 10s, 1 step/s, ETA 30s",
        "train spherical: 20/40 step (50%), 20s, 1 step/s, ETA 20s, loss=0.5000",
        "train spherical: 30/40 step (75%), 30s, 1 step/s, ETA 10s, loss=0.5000",
        "train spherical: 35/40 step (88%), 35s, 1 step/s, ETA 5s, loss=0.5000",
    ]
    quiet = io.StringIO()
    for _ in LineProgress(range(3), desc="short", leave=False, interval=10, file=quiet):
        pass
    assert quiet.getvalue() == ""  # short work that would leave no bar leaves no line


def test_the_mode_follows_the_terminal_unless_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr("sys.stderr", _Stream(tty=True))
    assert progress_mode() == "bar"
    monkeypatch.setattr("sys.stderr", _Stream(tty=False))
    assert progress_mode() == "lines"
    assert isinstance(progress_bar(range(2), desc="x"), LineProgress)
    for value in ("bar", "lines", "off"):
        monkeypatch.setenv(ENV, value)
        assert progress_mode() == value
    assert list(progress_bar(range(3), desc="x")) == [0, 1, 2]  # off: iterates, shows nothing
    monkeypatch.setattr("sys.stderr", _Stream(tty=True))
    assert progress_mode() == "off"  # the environment wins over the terminal


def test_a_command_writes_plain_lines_to_a_file_and_nothing_with_no_progress(tmp_path: Path) -> None:
    """CliRunner's stderr is not a terminal, as for `manifold-fm train ... 2> log`: lines, no carriage returns or
    escape codes; --no-progress: nothing on stderr, and the setting does not outlive the command."""
    args = ["train", *tiny_image_run(), "--steps", "2"]
    shown = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert shown.exit_code == 0, shown.output
    lines = shown.stderr.splitlines()
    assert "\r" not in shown.stderr and "\x1b" not in shown.stderr
    assert any(line.startswith("train spherical: 2/2 step (100%), ") for line in lines), shown.stderr
    quiet = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), "--no-progress"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and ENV not in os.environ
