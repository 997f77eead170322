"""The one version string agrees with the package metadata."""

from __future__ import annotations

from pathlib import Path

import pytest

import manifold_fm
from manifold_fm.version import __version__


def test_version_matches_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    assert __version__ == manifold_fm.__version__ == project["version"]
