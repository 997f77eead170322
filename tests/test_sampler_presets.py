"""Sampler presets by NFE budget: the table matches the benchmark that chose it, the budget is respected, and
``manifold-fm sample --nfe N`` samples exactly what the preset's explicit options sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from manifold_fm.cli import main
from manifold_fm.errors import InputError
from manifold_fm.sampler import NFE_PRESETS, SamplerSpec, network_evaluations, sampler_for_nfe

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def test_presets_are_the_benchmarks_choice() -> None:
    """NFE_PRESETS is what `python benchmarks/sampling.py nfe` chose (results/sampler_presets.json)."""
    chosen = json.loads((RESULTS / "sampler_presets.json").read_text())["presets"]
    assert {int(k): (v["method"], float(v["time_shift"])) for k, v in chosen.items()} == NFE_PRESETS


@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 5, 7, 8, 12, 16, 31, 32, 64, 100, 250])
def test_preset_never_exceeds_its_budget(nfe: int) -> None:
    preset = sampler_for_nfe(nfe)
    used = network_evaluations(SamplerSpec(**preset))
    assert used is not None and 1 <= used <= nfe
    budgets = [b for b in NFE_PRESETS if b <= nfe]
    if budgets:
        method, shift = NFE_PRESETS[max(budgets)]
        assert (preset["method"], preset["time_shift"]) == (method, shift)
        if nfe in NFE_PRESETS:
            assert used == nfe  # the benchmark's budgets are multiples of their methods' stages
    else:
        assert preset == {"method": "euler", "steps": nfe, "time_shift": 1.0}


def test_preset_rejects_zero() -> None:
    with pytest.raises(InputError, match="nfe must be >= 1"):
        sampler_for_nfe(0)


def test_sample_nfe_equals_the_explicit_options(tmp_path: Path) -> None:
    from manifold_fm.training.image import train_image

    run = tmp_path / "run"
    train_image("image-builtin", ["train.steps=2", "data.per_class=2", "train.batch_size=8"], run, progress=False)
    preset = sampler_for_nfe(8)
    common = ["sample", str(run), "--num", "6", "--no-grid"]
    by_nfe = CliRunner().invoke(main, [*common, "--nfe", "8", "--out", str(tmp_path / "a")])
    assert by_nfe.exit_code == 0, by_nfe.output
    explicit = [
        *("--method", str(preset["method"])),
        *("--steps", str(preset["steps"])),
        *("--time-shift", str(preset["time_shift"])),
    ]
    by_hand = CliRunner().invoke(main, [*common, *explicit, "--out", str(tmp_path / "b")])
    assert by_hand.exit_code == 0, by_hand.output
    a, b = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in "ab")
    np.testing.assert_array_equal(a, b)
    info = json.loads((tmp_path / "a" / "sample_info.json").read_text())
    assert (info["method"], info["steps"], info["time_shift"]) == tuple(preset.values())
    both = CliRunner().invoke(main, [*common, "--nfe", "8", "--steps", "3", "--out", str(tmp_path / "c")])
    assert both.exit_code == 2 and "pass --nfe or those, not both" in both.output


def _nfe_study() -> object:
    """benchmarks/sampling.py as a module (it imports its sibling ``reporting`` as a top-level module)."""
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("bench_sampling", bench / "sampling.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        sys.path.remove(str(bench))
    return module


def _rows(fds: dict[str, dict[str, list[float]]]) -> list[dict]:
    """Study rows of the spherical arm: ``fds[noise][setting]`` is the FD of each model (seed)."""
    rows = []
    for noise, settings in fds.items():
        for seed in range(3):
            scored = {name: {"fd_builtin_classifier": v[seed], "nfe": 4} for name, v in settings.items()}
            rows.append({"arm": "spherical", "seed": seed, "noise": noise, "settings": scored})
    return rows


@pytest.mark.parametrize(("gain", "chosen"), [(0.2, "euler-4-shift1"), (2.0, "midpoint-4-shift3")])
def test_a_preset_departs_from_euler_only_beyond_the_seed_spread_on_the_selection_noise(
    gain: float, chosen: str
) -> None:
    """The rule of benchmarks/sampling.py: chosen on the selection noise, reported on the other; the best setting
    replaces plain Euler only if it gains more than the spread of Euler's FD over the models (1.0 here)."""
    study = _nfe_study()
    euler = [3.0, 4.0, 5.0]  # sample sd 1.0
    select = {
        "euler-250": [3.0, 3.0, 3.0],
        "euler-4-shift1": euler,
        "euler-4-shift3": [v - gain / 2 for v in euler],
        "midpoint-4-shift3": [v - gain for v in euler],
    }
    # on the report noise the ranking differs: it must not decide anything
    report = {"euler-250": [2.0, 2.0, 2.0], "euler-4-shift1": [6.0, 6.0, 6.0], "euler-4-shift3": [1.0, 1.0, 1.0]}
    report["midpoint-4-shift3"] = [7.0, 7.0, 7.0]
    preset = study.best_presets(_rows({"select": select, "report": report}))[4]
    assert preset["best_on_selection"] == "midpoint-4-shift3" and preset["setting"] == chosen
    assert preset["seed_spread"] == pytest.approx(1.0) and preset["gain_on_selection"] == pytest.approx(gain)
    assert preset["fd"] == report[chosen][0] and preset["vs_250"] == pytest.approx(report[chosen][0] / 2.0 - 1)
