"""What the command line shows: whole config descriptions, a toy run's metrics, progress on stderr, an ETA that
leaves evaluations out, and pictures that name their rows and runs."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from manifold_fm.cli import main
from manifold_fm.config import BUILTIN_DIR, builtin_configs
from manifold_fm.eval.image_io import class_grid, save_image_grid


# ----------------------------------------------------------------------------------------------- configs
def _comment_words(name: str) -> list[str]:
    words = []
    for line in (BUILTIN_DIR / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        words += line.lstrip("#").split()
    return words


def test_configs_prints_every_description_whole_and_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    result = CliRunner().invoke(main, ["configs"])
    assert result.exit_code == 0, result.output
    names = builtin_configs()
    width = max(map(len, names))
    blocks: dict[str, list[str]] = {}
    for line in result.output.splitlines():
        head = line[:width].strip()
        if head:
            blocks[head] = []
        blocks[list(blocks)[-1]].append(line[width + 2 + 8 + 2 :])
        if "accelerate launch" not in line:  # a command line is never broken, whatever its length
            assert len(line) <= 100, line
    assert list(blocks) == names
    for name in names:
        assert " ".join(blocks[name]).split() == _comment_words(name), name
    # the default config's description ends where its comment ends, not mid-sentence
    assert " ".join(blocks["default"]).rstrip().endswith('--set "modes=[spherical]" for one flow).')


# ----------------------------------------------------------------------------------------------- toy metrics
def test_a_toy_run_prints_its_metrics_table(tmp_path: Path) -> None:
    from manifold_fm.training.toy import METRIC_MEANINGS

    out = tmp_path / "toy"
    sets = ["train.steps=3", "model.hidden=8", "train.batch_size=8", "eval.test_samples=4", "eval.plot_samples=8"]
    sets += ["eval.likelihood_steps=1", "sample.steps=1"]
    args = ["train", "--config", "toy-sphere", "--out", str(out), *[a for kv in sets for a in ("--set", kv)]]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {
        cells[0]: cells[1:]
        for line in result.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| metric")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert set(rows) == set(metrics)
    assert rows["test_nll"] == [f"{metrics['test_nll']:.4g}", METRIC_MEANINGS["test_nll"]]
    assert rows["train_steps"][0] == "3" and rows["path"][0] == "geodesic"
    assert result.stdout.rstrip().endswith(f"run folder: {out}")


# ----------------------------------------------------------------------------------------------- progress
def test_evaluate_shows_progress_on_stderr(
    tmp_path: Path, register_standin: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_standin("standin", pool=8, features=6, logits=5)  # type: ignore[operator]
    rng = np.random.default_rng(0)
    folder = tmp_path / "ref"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    npz = tmp_path / "samples.npz"
    np.savez(npz, rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    args = ["evaluate", str(npz), "--reference", str(folder), "--feature-extractor", "standin", "--no-prc"]
    monkeypatch.setenv("MANIFOLD_FM_PROGRESS", "bar")  # bars as on a terminal (the test's stderr is not one)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "read ref" in result.stderr and "Processing samples" in result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == [
        "fd[standin]",
        "inception_score_mean",
        "inception_score_std",
    ]
    quiet = CliRunner().invoke(main, [*args, "--no-progress"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == result.stdout


# ----------------------------------------------------------------------------------------------- ETA
def test_the_progress_bar_and_throughput_leave_evaluations_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: every training step takes 1 s, every evaluation 1000 s. The bar's elapsed time and rate (what
    its ETA divides by), the logged samples/s and train_seconds count the steps only."""
    from manifold_fm.data.sources import SamplerSource
    from manifold_fm.training import trainer as trainer_module
    from manifold_fm.training.builders import build_flow
    from manifold_fm.training.flow_objective import FlowObjective
    from manifold_fm.training.metrics_log import read_jsonl
    from manifold_fm.training.schema import load_toy_config
    from manifold_fm.training.toy import toy_dataset, toy_model
    from manifold_fm.training.trainer import Hook, Trainer

    now = [0.0]

    def clock() -> float:
        return now[0]

    bars = []

    from tqdm.auto import tqdm

    class ClockedBar(tqdm):  # type: ignore[misc]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self._time = clock
            self.start_t = self.last_print_t = clock()
            bars.append(self)

    original_step = Trainer.train_step

    def one_second_step(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        now[0] += 1.0
        return original_step(self, *args, **kwargs)

    seen: list[tuple[float, float]] = []  # the bar's (elapsed, rate) when each evaluation starts

    def evaluation(step: int, model: object) -> dict[str, float]:
        seen.append((bars[0].format_dict["elapsed"], bars[0].format_dict["rate"]))
        now[0] += 1000.0
        return {"evaluated": float(step)}

    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=clock))
    monkeypatch.setattr(trainer_module, "progress_bar", lambda *a, disable=False, **k: ClockedBar(*a, **k))
    monkeypatch.setattr(Trainer, "train_step", one_second_step)
    cfg = load_toy_config("toy-sphere", ["train.steps=6", "model.hidden=8", "train.batch_size=8", "train.log_every=3"])
    data = toy_dataset(cfg)
    trainer = Trainer(
        FlowObjective(toy_model(cfg, data), build_flow(cfg.flow, data.manifold), cfg.optim),
        SamplerSource(data.sample),
        cfg.train,
        tmp_path / "run",
        hooks=[Hook(2, evaluation)],
        device="cpu",
        progress=True,
    )
    trainer.fit()
    assert now[0] == 6 + 3 * 1000  # three evaluations happened (steps 2, 4, 6)
    assert len(bars) == 1 and bars[0].format_dict["elapsed"] == 6.0
    # so the ETA, (steps left) / rate, is 4 s, then 2 s: never the 1000 s of an evaluation
    assert seen == [(2.0, pytest.approx(1.0)), (4.0, pytest.approx(1.0)), (6.0, pytest.approx(1.0))]
    assert trainer.train_seconds == 6.0
    logged = [r["samples_per_s"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "samples_per_s" in r]
    assert logged == [8.0, 8.0]  # batch 8 per 1 s step


# ----------------------------------------------------------------------------------------------- pictures
def test_labelled_grids_keep_the_plain_grid_and_name_rows_and_title(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 16, 16, generator=g) * 2 - 1
    plain = np.asarray(Image.open(save_image_grid(images, tmp_path / "plain.png", nrow=6)))
    path = save_image_grid(images, tmp_path / "named.png", nrow=6, row_labels=["disk", "cross"], title="a run, step 9")
    named = Image.open(path)
    assert named.text == {"Title": "a run, step 9", "Row labels": "disk\ncross"}
    arr = np.asarray(named.convert("RGB"))
    h, w = plain.shape[:2]
    top, left = arr.shape[0] - h, arr.shape[1] - w
    assert top > 0 and left > 0
    assert np.array_equal(arr[top:, left:], plain)  # the pictures are untouched
    assert (arr[:top] < 128).any()  # the title is drawn
    for row in range(2):  # each row's label is drawn left of it
        band = arr[top + 2 + row * 18 : top + (row + 1) * 18, :left]
        assert (band < 128).any(), row
    assert "labels" not in Image.open(tmp_path / "plain.png").text
    with pytest.raises(ValueError, match="3 row labels for a grid of 2 rows"):
        save_image_grid(images, tmp_path / "x.png", nrow=6, row_labels=["a", "b", "c"])


def test_class_grid_puts_one_class_per_row() -> None:
    images = torch.arange(7, dtype=torch.float32).view(7, 1, 1, 1).expand(7, 3, 2, 2) / 10
    labels = [0, 1, 2, 0, 1, 2, 0]
    out, nrow, rows = class_grid(images, labels, ["a", "b", "c"])
    assert nrow == 3 and rows == ["a", "b", "c"]
    firsts = out[:, 0, 0, 0].tolist()
    assert firsts == pytest.approx([0.0, 0.3, 0.6, 0.1, 0.4, 1.0, 0.2, 0.5, 1.0])  # 1.0: blank (white) cells
    single, nrow, rows = class_grid(images[:7], [4] * 7, ["a", "b", "c", "d", "e"], max_per_row=3)
    assert nrow == 3 and rows == ["e", "e", "e"] and single.shape[0] == 9


def test_sample_grids_name_their_classes_and_run(tmp_path: Path) -> None:
    from manifold_fm.data.builtin_images import CLASS_NAMES
    from manifold_fm.training.image import train_image

    run = tmp_path / "run"
    train_image(
        "image-builtin",
        ["train.steps=2", "data.per_class=2", "train.batch_size=8", "train.sample_every=2", "sample.steps=2"],
        run,
        progress=False,
    )
    during = Image.open(run / "samples" / "step_00000002.png")
    assert during.text["Title"] == "image-builtin, step 2"
    assert during.text["Row labels"].splitlines() == list(CLASS_NAMES)
    result = CliRunner().invoke(main, ["sample", str(run), "--num", "14", "--steps", "2", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    grid = Image.open(tmp_path / "s" / "grid.png")
    assert grid.text["Title"] == "image-builtin (spherical): step 2, euler x 2"
    assert grid.text["Row labels"].splitlines() == list(CLASS_NAMES)  # 14 samples: two of classes 0 and 1
    assert re.fullmatch(r"\S+grid.png", result.stdout.splitlines()[-1])
    text = textwrap.dedent(result.stdout)
    assert str(tmp_path / "s" / "samples.npz") in text
