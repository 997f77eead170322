"""Importing manifold-fm prints nothing: no third-party warning reaches a user who imports the package, builds a
geoopt-backed manifold or takes the forward-mode derivative of its logmap (torch's FutureWarning that torch.jit.script
is deprecated, raised by geoopt's import and by torch's first forward-AD use, is silenced around those two loads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Every module of the package, then the three manifolds that import geoopt and the generic d(log) (forward AD), in a
# fresh interpreter with Python's default warning filters (what a user sees).
SCRIPT = """
import importlib, pkgutil
import torch
import manifold_fm
for info in pkgutil.walk_packages(manifold_fm.__path__, "manifold_fm."):
    importlib.import_module(info.name)
from manifold_fm.manifolds import build_manifold
for name in ("poincare_ball", "lorentz", "spd"):
    build_manifold(name)
m = build_manifold("poincare_ball")
x, y = m.random_base((4, 2)), m.random_base((4, 2))
m.dlogmap(x, y, m.proju(y, torch.randn(4, 2)))
"""


def test_importing_and_using_the_package_prints_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "", proc.stderr
