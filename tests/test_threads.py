"""CPU threads: one default (`manifold_fm.threads`), one `--threads` option on every compute command, one way to set
it; and thread counts printed in words ("1 thread", not "1 threads")."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from manifold_fm.cli import main
from manifold_fm.threads import DEFAULT_THREADS, pick_threads, threads_option, threads_text, using_threads
from manifold_fm.training.default_report import write_report

COMPUTE_COMMANDS = ["sample", "evaluate", "finetune-decoder", "extract-latents", "probe", "demo", "train"]


def test_the_default_is_one_thread_and_requests_are_clipped_to_the_cpus() -> None:
    assert DEFAULT_THREADS == 1  # measured: benchmarks/results/threads.md
    assert pick_threads() == 1 and pick_threads(None) == 1
    assert pick_threads(10**6) == (os.cpu_count() or 1)
    assert pick_threads(0) == 1


def test_using_threads_sets_and_restores() -> None:
    torch.set_num_threads(1)
    with using_threads(10**6) as n:
        assert n == torch.get_num_threads() == (os.cpu_count() or 1)
    assert torch.get_num_threads() == 1


def test_threads_option_runs_the_command_on_the_chosen_count_and_restores_it() -> None:
    seen: list[tuple[int, int | None]] = []

    @click.command()
    @threads_option
    def probe_threads(threads: int | None) -> None:
        seen.append((torch.get_num_threads(), threads))

    @click.command()
    @threads_option
    def no_parameter() -> None:
        seen.append((torch.get_num_threads(), -1))

    cpus = os.cpu_count() or 1
    torch.set_num_threads(cpus)
    assert CliRunner().invoke(probe_threads, []).exit_code == 0
    assert torch.get_num_threads() == cpus  # restored after the command
    assert CliRunner().invoke(probe_threads, ["--threads", str(cpus)]).exit_code == 0
    assert CliRunner().invoke(no_parameter, []).exit_code == 0
    assert seen == [(DEFAULT_THREADS, None), (cpus, cpus), (DEFAULT_THREADS, -1)]
    bad = CliRunner().invoke(probe_threads, ["--threads", "0"])
    assert bad.exit_code == 2 and "--threads" in bad.output


@pytest.mark.parametrize("name", COMPUTE_COMMANDS)
def test_every_compute_command_takes_threads(name: str) -> None:
    command = main.get_command(click.Context(main), name)
    assert command is not None
    option = next(p for p in command.params if p.name == "threads")
    assert option.opts == ["--threads"] and option.default is None


def test_train_threads_is_the_config_shortcut(tmp_path: Path) -> None:
    """`train --threads N` is `--set train.threads=N`: the run's config records it and the trainer applies it."""
    from manifold_fm.training import trainer as trainer_module

    applied: list[int] = []
    original = trainer_module.Trainer._fit

    def record(self, resume):  # noqa: ANN001, ANN202
        applied.append(torch.get_num_threads())
        return original(self, resume)

    out = tmp_path / "toy"
    tiny = ["train.steps=2", "model.hidden=8", "train.batch_size=8", "eval.test_samples=4", "eval.plot_samples=8"]
    tiny += ["eval.likelihood_steps=1", "sample.steps=1"]
    args = ["train", "--config", "toy-sphere", "--out", str(out), "--threads", "2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module.Trainer, "_fit", record)
        result = CliRunner().invoke(main, [*args, *[a for kv in tiny for a in ("--set", kv)]])
    assert result.exit_code == 0, result.output
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["threads"] == 2
    assert applied == [min(2, os.cpu_count() or 1)]


def test_thread_counts_are_printed_in_words(tmp_path: Path) -> None:
    assert threads_text(1) == "1 thread" and threads_text(2) == "2 threads"
    results = {"modes": {}, "references": {}, "total_s": 3.0}
    write_report(results, tmp_path, 1)
    assert (tmp_path / "results.md").read_text().endswith("Total wall time: 3 s (1 thread).\n")
    write_report(results, tmp_path, 2)
    assert (tmp_path / "results.md").read_text().endswith("Total wall time: 3 s (2 threads).\n")
    assert json.loads((tmp_path / "results.json").read_text())["total_s"] == 3.0
