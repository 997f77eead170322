"""Importing manifold-fm prints nothing: no third-party warning reaches a user who imports the package, builds a
geoopt-backed manifold or takes the forward-mode derivative of its logmap (torch's FutureWarning that torch.jit.script
is deprecated, raised by geoopt's import and by torch's first forward-AD use, is silenced around those two loads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import cpu_env

ROOT = Path(__file__).resolve().parents[1]

# Every module of the package, then the operations of the three manifolds that wrap geoopt (geoopt scripts its SPD
# kernels on first use) and d(log) (forward AD), in a fresh interpreter with Python's default warning filters.
SCRIPT = """
import importlib, pkgutil
import torch
import manifold_fm
for info in pkgutil.walk_packages(manifold_fm.__path__, "manifold_fm."):
    importlib.import_module(info.name)
from manifold_fm.manifolds import build_manifold
for name, shape in (("poincare_ball", (4, 2)), ("lorentz", (4, 3)), ("spd", (4, 2, 2))):
    m = build_manifold(name)
    x, y = m.random_base(shape), m.random_base(shape)
    u = m.proju(x, torch.randn(shape))
    m.dist(m.expmap(x, u), y), m.geodesic(x, y, 0.5), m.transp(x, y, u), m.logmap(x, y)
    m.dlogmap(x, y, m.proju(y, torch.randn(shape)))
"""


def test_importing_and_using_the_package_prints_nothing(tmp_path: Path) -> None:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=cpu_env(drop=("PYTHONWARNINGS",), PYTHONPATH=path),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "", proc.stderr
