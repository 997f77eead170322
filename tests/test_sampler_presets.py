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
