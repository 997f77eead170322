"""Manifold runs like the papers and like image runs (issue 22, items 2 and 3): validation NLL selects the best
weights, early stopping, the solver check, and train -> evaluate -> sample -> export -> from_pretrained -> resume
from the command line on a tiny lat/lon CSV."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

import manifold_fm
from manifold_fm.cli import main
from manifold_fm.manifolds import Sphere
from manifold_fm.training import toy
from manifold_fm.training.schema import load_toy_config


class _Zero(nn.Module):
    """A zero velocity field: the flow leaves the uniform prior on S^2 unchanged."""

    def __init__(self, tag: float = 0.0) -> None:
        super().__init__()
        self.tag = nn.Parameter(torch.tensor(tag))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x) * self.tag


class _Trainer:
    stopped_at: int | None = None
    step = 0

    def request_stop(self) -> None:
        self.stopped_at = self.step


def _data(n: int = 50) -> toy.RunData:
    x = Sphere(1.0).random_base((n, 3), generator=torch.Generator().manual_seed(0))
    return toy.RunData(Sphere(1.0), (3,), None, x, x, None, "test", {})  # type: ignore[arg-type]


def test_validation_nll_of_the_uniform_flow_is_log_4pi(tmp_path: Path) -> None:
    cfg = load_toy_config({"data": {"file": "x.csv"}, "eval": {"val_every": 1, "val_steps": 2}})
    hook = toy.validation_hook(cfg, _data(), tmp_path, [_Trainer()])
    assert hook is not None
    logged = hook.fn(1, _Zero())
    assert logged["val_nll"] == pytest.approx(math.log(4 * math.pi), abs=1e-5)


def test_best_weights_by_validation_nll_and_early_stopping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = iter([2.0, 1.5, 1.7, 1.8, 1.9, 1.0])
    monkeypatch.setattr(toy, "nll", lambda *a, **k: (next(scripted), 0.01))
    cfg = load_toy_config({"data": {"file": "x.csv"}, "eval": {"val_every": 10, "patience": 3}})
    trainer = _Trainer()
    hook = toy.validation_hook(cfg, _data(), tmp_path, [trainer])
    assert hook is not None
    for i, step in enumerate((10, 20, 30, 40, 50)):
        trainer.step = step
        hook.fn(step, _Zero(tag=float(i)))
        if step < 50:
            assert trainer.stopped_at is None, step  # 3 validations without improvement are needed
    assert toy.read_best(tmp_path) == {"step": 20, "val_nll": 1.5, "val_nll_stderr": 0.01}
    assert float(load_file(str(tmp_path / "best.safetensors"))["tag"]) == 1.0  # the weights of step 20
    assert trainer.stopped_at == 50
    chosen, which = toy.final_model(_Zero(tag=7.0), tmp_path)
    assert float(chosen.tag.detach()) == 1.0 and which == "best (step 20)"


def test_solver_check_warns_when_two_step_counts_disagree(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_toy_config({"data": {"file": "x.csv"}, "eval": {"likelihood_steps": 4}})
    monkeypatch.setattr(toy, "nll", lambda *a, **k: (1.30, 0.01))
    with pytest.warns(UserWarning, match="has not converged"):
        res = toy.solver_check(_Zero(), torch.zeros(2, 3), Sphere(1.0), cfg, mean=1.0, stderr=0.1)
    assert res["check_steps"] == 8 and res["solver_converged"] is False
    monkeypatch.setattr(toy, "nll", lambda *a, **k: (1.05, 0.01))
    assert toy.solver_check(_Zero(), torch.zeros(2, 3), Sphere(1.0), cfg, mean=1.0, stderr=0.1)["solver_converged"]


def _csv(path: Path, n: int = 80) -> Path:
    g = torch.Generator().manual_seed(1)
    lat, lon = 30 + 8 * torch.randn(n, generator=g), 20 + 15 * torch.randn(n, generator=g)
    path.write_text("# comment\nlat,lon\n" + "\n".join(f"{a:.3f},{b:.3f}" for a, b in zip(lat, lon, strict=True)))
    return path


TINY = [
    "--set", "model.hidden=8", "--set", "train.batch_size=16", "--set", "eval.likelihood_steps=2",
    "--set", "eval.check_steps=3", "--set", "eval.val_steps=2", "--set", "eval.val_every=2", "--set",
    "sample.steps=2", "--set", "eval.plot_samples=20", "--set", "optim.schedule=constant",
    "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=null", "--no-progress",
]  # fmt: skip


def _sessions(run: Path, step: int) -> list[dict]:
    return json.loads((run / "checkpoints" / f"step_{step:08d}" / "meta.json").read_text())["sessions"]


def test_cli_train_evaluate_sample_export_resume(tmp_path: Path) -> None:
    csv, run, runner = _csv(tmp_path / "pts.csv"), tmp_path / "run", CliRunner()
    train = ["train", "--config", "manifold-latlon", "--set", f"data.file={csv}", "--out", str(run), *TINY]
    res = runner.invoke(main, [*train, "--steps", "4"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["weights"].startswith("best (step") and "best_val_nll" in metrics
    assert any("val_nll" in json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines())
    # evaluate: the test NLL of the best weights, with its standard error, the solver and its check
    res = runner.invoke(main, ["evaluate", str(run)])
    assert res.exit_code == 0, res.output
    ev = json.loads((run / "evaluation.json").read_text())
    assert ev["test_nll"] == pytest.approx(metrics["test_nll"], abs=1e-5) and ev["test_points"] == 8
    assert "test NLL" in res.output and "rk4 x 2" in res.output and "with 4 steps" in res.output
    # sample: points (lat/lon) and a world map
    res = runner.invoke(main, ["sample", str(run), "--num", "30", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "s" / "samples.npy").shape == (30, 3)
    lines = (tmp_path / "s" / "samples.csv").read_text().splitlines()
    assert lines[0] == "lat,lon" and len(lines) == 31
    assert (tmp_path / "s" / "samples.png").stat().st_size > 1000
    res = runner.invoke(main, ["sample", str(run), "--num", "30", "--out", str(tmp_path / "s")])
    assert res.exit_code == 1 and "--overwrite" in res.output
    # export -> from_pretrained: the same weights, samples on the sphere and the run's log-density
    res = runner.invoke(main, ["export", str(run), "--out", str(tmp_path / "exp")])
    assert res.exit_code == 0, res.output
    pipe = manifold_fm.from_pretrained(tmp_path / "exp")
    best = load_file(str(run / "best.safetensors"))
    assert all(torch.equal(v, best[k]) for k, v in pipe.model.state_dict().items())
    x = pipe.sample(10, seed=0)
    assert x.shape == (10, 3) and torch.allclose(x.norm(dim=-1), torch.ones(10), atol=1e-5)
    assert torch.isfinite(pipe.log_prob(x)).all()
    # compare: the runs' val_nll by default
    res = runner.invoke(main, ["compare", str(run)])
    assert res.exit_code == 0 and "steps to" in res.output
    # resume: a longer run continues at step 4 (proven by the sessions), --checkpoint from an earlier step
    res = runner.invoke(main, ["train", "--out", str(run), "--resume", "--extend", "--steps", "6", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert _sessions(run, 6) == [{"start": 0, "steps": 4}, {"start": 4, "steps": 2}]
    res = runner.invoke(main, ["train", "--out", str(run), "--resume", "--checkpoint", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert _sessions(run, 6) == [{"start": 0, "steps": 2}, {"start": 2, "steps": 4}]


def test_early_stopping_ends_a_cli_run(tmp_path: Path) -> None:
    csv, run = _csv(tmp_path / "pts.csv"), tmp_path / "run"
    # lr 0: the validation NLL never improves on the first one, so patience 1 stops at the second validation
    res = CliRunner().invoke(
        main,
        ["train", "--config", "manifold-latlon", "--set", f"data.file={csv}", "--out", str(run), *TINY,
         "--steps", "20", "--set", "optim.lr=1e-30", "--set", "eval.patience=1"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    m = json.loads((run / "metrics.json").read_text())
    assert m["stopped_early"] is True and m["steps_trained"] == 4 and m["best_step"] == 2


def test_early_stopping_stops_every_process_of_a_two_process_run(tmp_path: Path) -> None:
    """The validation hook runs on the main process; its request to stop must reach the other process, which
    otherwise trains on alone and waits for the main process in the next gradient all-reduce (a hang)."""
    import subprocess

    from helpers import accelerate_command, cpu_env, kill_launched

    csv, run = _csv(tmp_path / "pts.csv"), tmp_path / "run"
    args = ["train", "--config", "manifold-latlon", "--set", f"data.file={csv}", "--out", str(run), *TINY,
            "--steps", "20", "--set", "optim.lr=1e-30", "--set", "eval.patience=1"]  # fmt: skip
    log = tmp_path / "launch.log"
    with log.open("w") as stdout:
        proc = subprocess.Popen(
            accelerate_command("-m", "manifold_fm.cli", *args),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=cpu_env(),
        )
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            kill_launched(proc)
            pytest.fail("the two-process run did not end after early stopping (a process kept training)")
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["stopped_early"] is True and m["steps_trained"] == 4 and m["best_step"] == 2
    assert _sessions(run, 4) == [{"start": 0, "steps": 4}]


def test_sample_plots_chart_hyperbolic_points_on_the_poincare_disk(tmp_path: Path) -> None:
    from manifold_fm.data.toy import LorentzWrappedNormalMixture
    from manifold_fm.eval.plots import plot_points
    from manifold_fm.manifolds import FlatTorus

    data = LorentzWrappedNormalMixture(curvature=2.0)
    x = data.sample(200, torch.Generator().manual_seed(0), dtype=torch.float64)
    chart = data.manifold.chart2d(x)
    ball = data.to_ball(x)  # the mixture's own isometry, an independent reference
    assert torch.allclose(chart.u, ball[:, 0]) and torch.allclose(chart.v, ball[:, 1])
    assert chart.disk_radius == pytest.approx(1 / math.sqrt(2.0))
    for manifold, pts in ((data.manifold, x), (FlatTorus(), torch.rand(50, 2) * 6 - 3), (Sphere(1.0), x[:, :3])):
        path = plot_points(manifold.projx(pts), manifold, tmp_path / f"{type(manifold).__name__}.png")
        assert path.stat().st_size > 1000
