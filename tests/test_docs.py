"""The documentation site builds in strict mode, so a broken link or cross-reference fails the test suite.

Builds run ``python -m mkdocs build --strict`` in a subprocess (a few seconds: mkdocstrings reads the package by
static analysis, nothing heavy is imported).
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from helpers import cpu_env

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _build(config_dir: Path, site_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site_dir)],
        cwd=config_dir,
        env=cpu_env(NO_MKDOCS_2_WARNING="1"),
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = _build(ROOT, out)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


class _Loader(yaml.SafeLoader):
    """mkdocs.yml may hold ``!!python/name`` tags (material's emoji options); ignore any tag when reading nav."""


_Loader.add_multi_constructor("", lambda loader, suffix, node: None)


def _nav_files(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in _nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in _nav_files(value)]
    return []


def test_strict_build_succeeds(site: Path) -> None:
    for page in ["index.html", "concepts/sfm/index.html", "reference/cli/index.html", "comparison/index.html"]:
        assert (site / page).is_file(), page


def test_every_page_is_in_the_nav_and_exists() -> None:
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)
    in_nav = set(_nav_files(config["nav"]))
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert in_nav - on_disk == set(), "nav entries without a page"
    assert on_disk - in_nav == set(), "pages missing from the nav"


def test_cli_reference_lists_every_subcommand(site: Path) -> None:
    from manifold_fm.cli import main

    html = (site / "reference/cli/index.html").read_text()
    names = main.list_commands(click.Context(main))
    for name in names:
        assert f"manifold-fm {name}" in html, f"subcommand {name} is not in the CLI reference"
    # click >= 8.2 marks unset defaults with a sentinel that mkdocs-click's table style prints verbatim.
    assert "Sentinel.UNSET" not in html


def test_api_reference_renders_docstrings(site: Path) -> None:
    html = (site / "reference/api/manifolds/index.html").read_text()
    # The class names and a phrase from a docstring (rendered from source, not copied into the page).
    for needle in ["TokenSpheres", "random_base", "The product of per-token spheres"]:
        assert needle in html, needle
    # Sphinx roles in docstrings are rewritten into links (docs/_ext/rst_roles.py), never printed literally.
    for page in (site / "reference" / "api").rglob("index.html"):
        text = page.read_text()
        assert not re.search(r":(class|func|meth|mod|data|attr):`", text), f"raw Sphinx role in {page}"
    assert 'href="#manifold_fm.paths.GeodesicPath"' in (site / "reference/api/engine/index.html").read_text()


# Modules whose ``__all__`` is the public API; every name in it must have an entry in the API reference.
PUBLIC_MODULES = [
    "manifold_fm.manifolds",
    "manifold_fm.manifolds.testing",
    "manifold_fm.paths",
    "manifold_fm.time",
    "manifold_fm.loss",
    "manifold_fm.coupling",
    "manifold_fm.solvers",
    "manifold_fm.guidance",
    "manifold_fm.likelihood",
    "manifold_fm.models",
    "manifold_fm.tokenizers",
    "manifold_fm.data.points",
    "manifold_fm.data.toy",
    "manifold_fm.data.sources",
    "manifold_fm.flow",
    "manifold_fm.sampler",
    "manifold_fm.config",
    "manifold_fm.errors",
    "manifold_fm.seeding",
    "manifold_fm.eval.image_io",
    "manifold_fm.eval.over_training",
    "manifold_fm.eval.plots",
    "manifold_fm.eval.sample_quality",
    "manifold_fm.precision",
    "manifold_fm.distributed",
    "manifold_fm.training.schema",
    "manifold_fm.training.trainer",
    "manifold_fm.training.builders",
    "manifold_fm.training.runs",
    "manifold_fm.training.toy",
    "manifold_fm.training.run_folder",
    "manifold_fm.threads",
    "manifold_fm.timing",
]


def test_api_reference_covers_every_public_name(site: Path) -> None:
    ids: set[str] = set()
    for page in (site / "reference" / "api").rglob("index.html"):
        ids |= set(re.findall(r'id="(manifold_fm\.[A-Za-z0-9_.]+)"', page.read_text()))
    missing = []
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        for public in getattr(module, "__all__", []):
            # Re-exports may be documented where they are defined (e.g. lazily imported tokenizers).
            if not any(i.startswith(name + ".") and i.endswith("." + public) for i in ids):
                missing.append(f"{name}.{public}")
    assert not missing, f"public names missing from docs/reference/api: {missing}"


def test_accuracy_page_includes_the_benchmark_report(site: Path) -> None:
    """The numerical-accuracy page shows the generated report itself (not retyped numbers)."""
    report = (ROOT / "benchmarks" / "results" / "accuracy.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("|")]
    first_row = rows[2]  # header, separator, then the first data row
    html = (site / "benchmarks/accuracy/index.html").read_text()
    for cell in first_row.strip("|").split("|"):
        assert f"<td>{cell.strip()}</td>" in html, cell


def test_strict_build_fails_on_a_broken_reference(tmp_path: Path) -> None:
    """The guard itself: the site's configuration (same plugins, same strictness) on a one-page site must reject a
    dangling cross-reference, while the same page with a valid one builds."""
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)
    config["nav"] = ["index.md"]
    config.pop("extra_javascript", None)
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    shutil.copytree(DOCS / "_ext", tmp_path / "docs" / "_ext")  # the griffe extension named in the config
    page = tmp_path / "docs" / "index.md"
    good = "# Page\n\nSee [spheres][manifold_fm.manifolds.Sphere].\n\n::: manifold_fm.manifolds.Sphere\n"
    page.write_text(good)
    proc = _build(tmp_path, tmp_path / "site")
    assert proc.returncode == 0, f"the one-page control site failed to build:\n{proc.stdout}\n{proc.stderr}"
    page.write_text(good + "\nSee [nothing][manifold_fm.manifolds.NoSuchManifold].\n")
    proc = _build(tmp_path, tmp_path / "site")
    assert proc.returncode != 0
    assert re.search(r"NoSuchManifold", proc.stdout + proc.stderr)
