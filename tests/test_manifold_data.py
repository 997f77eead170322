"""Manifold runs on a user's points (issue 22, item 1): file formats, lat/lon conversion, the on-manifold check by line,
the seeded split, every point used every epoch, manifolds by name or import path, one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from manifold_fm.cli import main
from manifold_fm.data.points import check_on_manifold, latlon_to_sphere, read_points, split_points
from manifold_fm.data.sources import BatchPlan, TensorSource
from manifold_fm.errors import InputError
from manifold_fm.manifolds import FlatTorus, Sphere
from manifold_fm.training.schema import load_run_config

POINTS = np.array([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])


def test_every_file_format_reads_the_same_points(tmp_path: Path) -> None:
    csv = tmp_path / "p.csv"
    csv.write_text("# a comment\nx,y,z\n" + "\n".join(",".join(map(str, r)) for r in POINTS) + "\n")
    np.save(tmp_path / "p.npy", POINTS)
    np.savez(tmp_path / "p.npz", points=POINTS, other=np.zeros(2))
    torch.save({"points": torch.from_numpy(POINTS)}, tmp_path / "p.pt")
    for name in ("p.csv", "p.npy", "p.npz", "p.pt"):
        x, where = read_points(tmp_path / name)
        assert x.dtype == torch.float64 and torch.equal(x, torch.from_numpy(POINTS)), name
    # rows are named by their line in the file (comment and header lines counted)
    assert read_points(csv)[1] == ["line 3", "line 4", "line 5"]
    assert read_points(tmp_path / "p.npy")[1][0] == "row 1"


def test_latlon_against_a_hand_computed_point() -> None:
    # lat 30, lon 60: (cos30 cos60, cos30 sin60, sin30) = (sqrt3/4, 3/4, 1/2)
    x = latlon_to_sphere(torch.tensor([[30.0, 60.0], [-90.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(x[0], torch.tensor([math.sqrt(3) / 4, 0.75, 0.5], dtype=torch.float64), atol=1e-15)
    assert torch.allclose(x[1], torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64), atol=1e-15)


def test_off_manifold_rows_are_named_by_line_unless_projected(tmp_path: Path) -> None:
    csv = tmp_path / "p.csv"
    csv.write_text("x,y,z\n1,0,0\n0,2,0\n0,0,1\n0.5,0.5,0\n")
    x, where = read_points(csv)
    with pytest.raises(InputError) as err:
        check_on_manifold(x, Sphere(1.0), where, tolerance=1e-4)
    msg = str(err.value)
    assert "line 3 (error 1)" in msg and "line 5" in msg and "line 2" not in msg and "line 4" not in msg
    assert "tolerance 0.0001" in msg and "data.project=true" in msg
    projected = check_on_manifold(x, Sphere(1.0), where, tolerance=1e-4, project=True)
    assert torch.allclose(projected[1], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def test_split_is_seeded_disjoint_and_complete() -> None:
    a, b, c = split_points(103, (0.8, 0.1, 0.1), seed=3), split_points(103, (0.8, 0.1, 0.1), seed=3), split_points(103)
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("train", "val", "test"))
    assert not torch.equal(a.train, c.train)
    assert (a.train.numel(), a.val.numel(), a.test.numel()) == (83, 10, 10)
    assert sorted(torch.cat([a.train, a.val, a.test]).tolist()) == list(range(103))
    assert split_points(100, (0.5, 0.25, 0.25)).val.numel() == 25


def test_no_drop_source_uses_every_point_every_epoch() -> None:
    data = torch.arange(10.0)[:, None]
    plan = BatchPlan(batch_size=4, seed=0)
    epoch = torch.cat([x for x, _ in TensorSource(data, drop_last=False).batches(plan, 0, 3)]).flatten()
    assert set(epoch.tolist()) == set(range(10)) and epoch.numel() == 12
    dropped = torch.cat([x for x, _ in TensorSource(data).batches(plan, 0, 2)]).flatten()
    assert len(set(dropped.tolist())) == 8  # the default drops the tail


def test_config_manifold_by_name_or_import_path_and_toy_alias() -> None:
    from manifold_fm.training.toy import build_run_manifold

    cfg = load_run_config({"kind": "manifold", "manifold": "flat_torus", "data": {"file": "x.csv"}})
    assert isinstance(build_run_manifold(cfg.manifold), FlatTorus)
    cfg = load_run_config(
        {"kind": "toy", "manifold": {"name": "manifold_fm.manifolds:Sphere", "params": {"radius": 2.0}},
         "data": {"file": "x.csv"}}
    )  # fmt: skip
    m = build_run_manifold(cfg.manifold)
    assert isinstance(m, Sphere) and m.radius == 2.0
    assert load_run_config("toy-sphere").kind == "toy"


def _latlon_csv(path: Path, n: int = 60) -> Path:
    g = torch.Generator().manual_seed(0)
    lat = 40 + 5 * torch.randn(n, generator=g)
    lon = -100 + 10 * torch.randn(n, generator=g)
    path.write_text("lat,lon\n" + "\n".join(f"{a:.4f},{b:.4f}" for a, b in zip(lat, lon, strict=True)) + "\n")
    return path


TINY = [
    "--set", "train.steps=4", "--set", "model.hidden=8", "--set", "train.batch_size=16",
    "--set", "eval.likelihood_steps=2", "--set", "eval.check_steps=0", "--set", "sample.steps=2",
    "--set", "eval.plot_samples=20", "--no-progress",
]  # fmt: skip


def test_cli_trains_on_a_latlon_csv_and_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    csv = _latlon_csv(tmp_path / "pts.csv")
    runner = CliRunner()
    out = tmp_path / "run"
    base = ["train", "--config", "manifold-latlon", "--set", f"data.file={csv}", "--out", str(out), *TINY]
    res = runner.invoke(main, base)
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert (m["train_points"], m["val_points"], m["test_points"]) == (48, 6, 6)
    assert math.isfinite(m["test_nll"]) and m["dataset"] == "pts.csv"
    # a bad dataset parameter names the valid ones, in one line
    res = runner.invoke(main, ["train", "--config", "toy-sphere", "--set", "data.params.kappa=abc", *TINY])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "no parameter kappa" in res.output and "means, kappas, weights, components" in res.output
    # an off-manifold row (xyz file on the sphere) is named with its line
    bad = tmp_path / "xyz.csv"
    bad.write_text("1,0,0\n0,1,0\n0,0,1.5\n" * 4)
    res = runner.invoke(
        main, ["train", "--config", "manifold-latlon", "--set", f"data.file={bad}", "--set", "data.latlon=null",
               "--out", str(tmp_path / "bad"), *TINY],
    )  # fmt: skip
    assert res.exit_code == 1 and "line 3 (error 0.5)" in res.output and "tolerance" in res.output
