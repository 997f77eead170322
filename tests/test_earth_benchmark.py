"""benchmarks/earth.py on tiny synthetic CSVs in the formats of the public earth-science files (comment lines, a
header or none), end to end in its quick mode: every set trained and evaluated, the report beside the published rows."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from helpers import cpu_env

ROOT = Path(__file__).resolve().parents[1]
HEADERS = {
    "volerup.csv": "# source\nLatitude,Longitude\n",
    "quakes_all.csv": "# source\n# removed events\n# more\nLATITUDE,LONGITUDE\n",
    "flood.csv": "# source\nlat,long\n",
    "fire.csv": "# source\n",  # no header line
}


def test_earth_benchmark_quick_on_synthetic_files(tmp_path: Path) -> None:
    data = tmp_path / "earth"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for name, head in HEADERS.items():
        lat, lon = 30 * torch.randn(60, generator=g).clamp(-2.9, 2.9), 60 * torch.randn(60, generator=g).clamp(-3, 3)
        (data / name).write_text(head + "\n".join(f"{a:.3f},{b:.3f}" for a, b in zip(lat, lon, strict=True)) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "benchmarks/earth.py", "--data", str(data), "--quick", "--out", str(out), "--work",
           str(tmp_path / "work")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=cpu_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "earth.json").read_text())
    assert [r["set"] for r in result["runs"]] == ["volcano", "earthquake", "flood", "fire"]
    for row in result["runs"]:
        assert math.isfinite(row["test_nll"]) and row["points"] == {"train": 48, "val": 6, "test": 6}
        assert len(row["curve"]) >= 2 and row["curve"][-1]["step"] == row["steps_trained"]
    report = (out / "earth.md").read_text()
    assert "-7.93 ± 1.67" in report and "-1.33 ± 0.06" in report and "score-based row" in report
    assert "Written by `python benchmarks/earth.py" in report
    # the entry needs its data folder (nothing is downloaded)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "earth"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=cpu_env())  # fmt: skip
    assert proc.returncode == 2 and "--data" in proc.stderr
