"""Errors that tell the truth: a usage error is one ``Error:`` line with exit status 2, any other user error one
``Error:`` line (no traceback) with exit status 1, as the command-line guide says; a bug in our code surfaces with its
traceback and one line asking to report it, from the one handler in ``manifold_fm/cli.py``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from manifold_fm.cli import INPUT_EXIT, REPORT_LINE, USAGE_EXIT, is_user_error, main
from manifold_fm.training.run_folder import OVERWRITE_AND_RESUME

from helpers import cpu_env

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "command-line.md"


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["train", "--config", "toy-sphere", "--set", "train.stepz=3"], "unknown config key 'train.stepz'"),  # Config
        (["evaluate", "{tmp}/nothing.npz"], "does not exist"),  # FileNotFoundError
        (["evaluate", "{tmp}/one.npz"], "holds 1 image(s); Fréchet distances need at least 2"),  # InputError
        (["evaluate", "{tmp}/bad.npz"], "has no arr_0 image array"),  # InputError from eval/fid.py
        (["sample", "{tmp}/no-run"], "does not exist"),
        (["probe", "--tokenizer", "{tmp}/no-vae", "--out", "{tmp}/p"], "tokenizer folder"),  # not a hub id
        (["compare", "{tmp}/no-run"], "is not a folder"),
        (  # InputError from data/latents.py
            [
                "train",
                "--config",
                "image-sit-b2-latents",
                "--set",
                "data.latents={tmp}/cache",
                "--set",
                "tokenizer.kind=none",
            ]
            + ["--out", "{tmp}/r"],
            "is not valid JSON",
        ),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path: Path, args: list[str], expected: str) -> None:
    np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text("{not json")
    result = CliRunner().invoke(main, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == INPUT_EXIT == 1, result.output
    assert expected in _one_error_line(result.output) and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args,expected",
    [
        (["train", "--steps", "-5"], "Invalid value for '--steps': -5 is not in the range x>=0."),  # out of range
        (["train", "--threads", "0"], "Invalid value for '--threads'"),
        (["sample", "{tmp}", "--threads", "two"], "Invalid value for '--threads'"),  # wrong type
        (["train", "--path", "curved"], "Invalid value for '--path'"),  # not among the choices
        (["train", "--overwrite", "--resume"], OVERWRITE_AND_RESUME),  # raised by the command
        (["sample", "{tmp}", "--nfe", "4", "--steps", "3"], "pass --nfe or those, not both"),
        (["probe", "--num", "1", "--out", "{tmp}/p"], "--num and --t-points must be at least 2"),
        (["evaluate", "--bogus"], "No such option '--bogus'"),  # unknown option
        (["evaluate"], "Missing argument 'SAMPLES'."),
        (["train", "--set"], "Option '--set' requires an argument."),
        (["trian"], "No such command 'trian'."),  # the group's own parsing
        (["--bogus"], "No such option '--bogus'."),
    ],
)
def test_usage_errors_are_one_line_with_the_usage_exit_status(tmp_path: Path, args: list[str], expected: str) -> None:
    """click prints the usage, a --help hint and the error (three lines); the guide promises one ``Error:`` line."""
    result = CliRunner().invoke(main, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == USAGE_EXIT == 2, result.output
    assert expected in _one_error_line(result.output)
    assert not (tmp_path / "p").exists()  # nothing ran


def test_the_guide_states_the_exit_statuses_the_code_uses() -> None:
    guide = " ".join(GUIDE.read_text().split())
    assert f"one `Error: ...` line and exit status {USAGE_EXIT}" in guide
    assert f"one `Error: ...` line and exit status {INPUT_EXIT}" in guide


def test_an_injected_bug_keeps_its_exception_and_asks_for_a_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ValueError (the type the CLI used to swallow) and a TypeError raised by a bug propagate unchanged, with the
    report line attached; nothing is printed as a user error."""
    import manifold_fm.training.schema as schema

    for exc in (ValueError("shapes (3,) and (4,) do not match"), TypeError("unsupported operand")):

        def broken(*args: object, exc: Exception = exc, **kwargs: object) -> None:
            raise exc

        monkeypatch.setattr(schema, "load_run_config", broken)
        result = CliRunner().invoke(main, ["train", "--config", "toy-sphere"])
        assert result.exit_code == 1 and result.exception is exc
        assert REPORT_LINE in getattr(exc, "__notes__", [])
        assert not any(line.startswith("Error: ") for line in result.output.splitlines())


def test_an_injected_bug_prints_its_traceback_then_the_report_line(tmp_path: Path) -> None:
    """The real console behaviour, in a fresh interpreter: traceback, the exception, then the report line."""
    script = textwrap.dedent(
        """
        import manifold_fm.config as config
        from manifold_fm.cli import main

        def broken(*args, **kwargs):
            return 1 / 0  # a bug in our code

        config.builtin_configs = broken
        main(["configs"])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=cpu_env()
    )
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert any(line.startswith("Traceback") for line in err), proc.stderr
    assert "ZeroDivisionError: division by zero" in proc.stderr and "in broken" in proc.stderr
    assert err[-1] == REPORT_LINE
    assert not any(line.startswith("Error: ") for line in (proc.stdout + proc.stderr).splitlines())


def test_only_typed_errors_are_user_errors() -> None:
    """User errors are typed (InputError, ConfigError, ...); a plain ValueError is a bug wherever it was raised, in
    numpy (a bug in how we call it) or in one of our modules."""

    def raised_in(filename: str) -> BaseException:
        namespace: dict[str, object] = {}
        exec(compile("def check():\n    raise ValueError('cache is incomplete')\n", filename, "exec"), namespace)
        try:
            namespace["check"]()  # type: ignore[operator]
        except ValueError as exc:
            return exc
        raise AssertionError("not raised")

    assert not is_user_error(raised_in("/site/manifold_fm/training/runs.py"))
    assert not is_user_error(raised_in("/site/manifold_fm/likelihood.py"))
    try:
        np.zeros(2).reshape(3)
    except ValueError as exc:
        assert not is_user_error(exc)
    from manifold_fm.config import ConfigError
    from manifold_fm.errors import InputError

    assert is_user_error(ConfigError("x")) and is_user_error(InputError("x")) and is_user_error(FileNotFoundError())
    assert not is_user_error(RuntimeError("x")) and not is_user_error(KeyError("x"))
