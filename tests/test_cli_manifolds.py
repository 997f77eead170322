"""`manifold-fm manifolds` / `manifold-fm demo` and the name registry behind them."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner

from manifold_fm.cli import main
from manifold_fm.manifolds import Manifold, available_manifolds, build_manifold

# A point shape for each registered manifold (its own layout).
SHAPES = {
    "euclidean": ((3, 4), {}),
    "sphere": ((3, 4), {"radius": 2.0}),
    "token_spheres": ((3, 4, 2, 2), {"dim": 4}),
    "flat_torus": ((3, 2), {}),
    "product": ((3, 5), {"factors": [{"name": "sphere", "shape": 3}, {"name": "flat_torus", "shape": 2}]}),
    "poincare_ball": ((3, 2), {"c": 0.5}),
    "lorentz": ((3, 3), {}),
    "spd": ((3, 2, 2), {}),
}


def test_registry_covers_every_name() -> None:
    assert set(available_manifolds()) == set(SHAPES)


@pytest.mark.parametrize("name", list(SHAPES))
def test_build_manifold_samples_valid_points(name: str) -> None:
    shape, kwargs = SHAPES[name]
    m = build_manifold(name, **kwargs)
    assert isinstance(m, Manifold)
    x = m.random_base(shape, generator=torch.Generator().manual_seed(0))
    assert x.shape == shape
    m.check_point(x)


def test_build_manifold_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="unknown manifold 'shpere'; available: euclidean"):
        build_manifold("shpere")
    with pytest.raises(ValueError, match="unknown option.*rad.*valid options: radius"):
        build_manifold("sphere", rad=2.0)
    with pytest.raises(ValueError, match="factor 0 must be a mapping"):
        build_manifold("product", factors=[3])
    with pytest.raises(ValueError, match="radius must be a finite positive"):
        build_manifold("sphere", radius=-1.0)


def test_product_from_config_lays_factors_out_in_order() -> None:
    m = build_manifold(
        "product",
        factors=[{"name": "sphere", "shape": 3, "radius": 2.0}, {"name": "euclidean", "shape": 2}],
    )
    x = m.random_base((4, 5))
    assert torch.allclose(x[:, :3].norm(dim=-1), torch.full((4,), 2.0))


def test_cli_manifolds_lists_names_and_descriptions() -> None:
    result = CliRunner().invoke(main, ["manifolds"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == len(available_manifolds())
    for line, (name, desc) in zip(lines, available_manifolds().items(), strict=True):
        assert line.startswith(name) and line.rstrip().endswith(desc)
    names = CliRunner().invoke(main, ["manifolds", "--names-only"])
    assert names.output.split() == list(available_manifolds())


def test_cli_demo_prints_accuracy_and_slerp_tables() -> None:
    result = CliRunner().invoke(main, ["demo", "--batch", "2", "--reps", "1"])
    assert result.exit_code == 0, result.output
    assert "float32 angle accuracy" in result.output
    # the accuracy rows: ours beats acos by orders of magnitude at 1e-6 rad
    row = next(line for line in result.output.splitlines() if line.strip().startswith("1e-06"))
    ours, naive = (float(v) for v in row.split()[1:3])
    assert ours < 1e-5 and naive > 1e-2
    on_sphere = re.search(r"\|x_t\| - R \| / R\s+([0-9.e+-]+)", result.output)
    assert on_sphere is not None and float(on_sphere.group(1)) < 1e-6


def test_cli_demo_rejects_bad_batch() -> None:
    result = CliRunner().invoke(main, ["demo", "--batch", "0"])
    assert result.exit_code != 0
    assert "--batch" in result.output


def test_demo_times_slerp_with_the_geometry_benchmarks_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's slerp timing and benchmarks/bench_geometry.py's use the same shapes, thread count and linear
    interpolation (the demo prints its setup; the benchmark's defaults are read from what it runs)."""
    import sys
    from pathlib import Path

    from manifold_fm.commands import demo as demo_module

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))
    import bench_geometry

    class Ran(Exception):
        pass

    ran: dict[str, object] = {}

    def fake_run(batch: int, channels: int, size: int, reps: int, compile_: bool) -> dict:
        ran.update(shape=(batch, channels, size, size), reps=reps, threads=torch.get_num_threads())
        raise Ran

    monkeypatch.setattr(bench_geometry, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["bench_geometry.py", "--out", str(Path(__file__).parent / "unused")])
    with pytest.raises(Ran):
        bench_geometry.main()
    assert ran == {"shape": (256, 32, 16, 16), "reps": 21, "threads": 1}
    assert bench_geometry.lerp_target is demo_module.lerp_target  # the same linear interpolation is timed

    result = CliRunner().invoke(main, ["demo", "--reps", "1"])
    assert result.exit_code == 0, result.output
    assert "batch (256, 32, 16, 16), float32, 1 thread, median of 1 interleaved repetitions" in result.output
    assert "the setup of benchmarks/bench_geometry.py" in result.output
    other = CliRunner().invoke(main, ["demo", "--reps", "1", "--batch", "4"])
    assert other.exit_code == 0 and "not the setup of benchmarks/bench_geometry.py (batch 256)" in other.output


def test_lerp_target_is_the_linear_interpolation() -> None:
    from manifold_fm.commands.demo import lerp_target

    x0, x1, t = (
        torch.randn(3, 2, 4, 4, dtype=torch.float64),
        torch.randn(3, 2, 4, 4, dtype=torch.float64),
        torch.rand(3),
    )
    x_t, u = lerp_target(x0, x1, t.double())
    for i in range(3):
        assert torch.equal(u[i], x1[i] - x0[i])
        assert torch.allclose(x_t[i], (1 - t[i].double()) * x0[i] + t[i].double() * x1[i], atol=1e-12)
