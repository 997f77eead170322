"""Every number is traceable: the results files that the READMEs and the docs quote exist, each committed report
names the command that wrote it, and ``python -m benchmarks all --quick`` (how CI runs every benchmark script)
writes every report without touching the committed results."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cpu_env

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# `python -m benchmarks`'s table: every CPU entry (not --long) and the reports it writes
ENTRIES = _load("benchmarks_main", ROOT / "benchmarks" / "__main__.py").ENTRIES
CPU = {e.script: e.outputs for e in ENTRIES.values() if not e.long}
# this file's own list (so that an entry dropped from the table is noticed): script -> (json, md)
SCRIPTS = {
    "bench_accuracy.py": ("accuracy.json", "accuracy.md"),
    "bench_geometry.py": ("geometry.json", "geometry.md"),
    "bench_engine.py": ("engine.json", "engine.md"),
    "bench_training.py": ("training.json", "training.md"),
    "bench_latent_cache.py": ("latent_cache.json", "latent_cache.md"),
    "compute_budget.py": ("compute_budget.json", "compute_budget.md"),
    "toy_nll.py": ("toy_nll.json", "toy_nll.md"),
    "bench_threads.py": ("threads.json", "threads.md"),
}
# pages that quote results: the docs, the top-level README, the benchmarks' and the ImageNet package's READMEs
PAGES = [
    *sorted((ROOT / "docs").rglob("*.md")),
    ROOT / "README.md",
    ROOT / "benchmarks" / "README.md",
    ROOT / "experiments" / "imagenet_sfm" / "README.md",
]


def _expand(path: str) -> list[str]:
    """``results/accuracy.{md,json}`` -> both names."""
    m = re.search(r"\{([^{}]+)\}", path)
    if m is None:
        return [path]
    return [p for alt in m.group(1).split(",") for p in _expand(path[: m.start()] + alt.strip() + path[m.end() :])]


def _results_references(page: Path) -> list[tuple[str, Path]]:
    """Every results file a page includes (``--8<--``), links to, or names in inline code; (as written, resolved)."""
    text = page.read_text()
    refs: list[tuple[str, Path]] = []
    for inc in re.findall(r'--8<--\s+"([^"]+)"', text):  # mkdocs snippets: relative to the repository root
        refs.append((inc, ROOT / inc))
    for link in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text):  # Markdown links: relative to the page
        if "results/" in link and "://" not in link:
            refs += [(p, (page.parent / p).resolve()) for p in _expand(link)]
    for code in re.findall(r"`([^`\s]*results/[^`\s]+)`", text):  # `benchmarks/results/x.md`, `results/x.{json,md}`
        for p in _expand(code):
            base = ROOT if p.startswith("benchmarks/") else page.parent
            refs.append((p, (base / p).resolve()))
    return refs


def test_the_pages_quote_results_files() -> None:
    """The scan below finds references at all (a guard against a regex that silently matches nothing)."""
    found = {str(path.relative_to(ROOT)) for page in PAGES for _, path in _results_references(page)}
    assert "benchmarks/results/accuracy.md" in found
    assert "benchmarks/results/compute_budget.md" in found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_quoted_results_file_exists(page: Path) -> None:
    missing = [written for written, path in _results_references(page) if not path.is_file()]
    assert not missing, f"{page.relative_to(ROOT)} refers to results files that are not in the repository: {missing}"


def test_every_script_is_an_entry() -> None:
    assert set(SCRIPTS) <= set(CPU)
    assert all(CPU[script] == outputs for script, outputs in SCRIPTS.items())


@pytest.mark.parametrize("script", sorted(CPU))
def test_committed_reports_name_their_command(script: str) -> None:
    """Each committed Markdown report says which command wrote it (a full run, not --quick), and its JSON agrees."""
    md, js = (RESULTS / f"{Path(CPU[script][0]).stem}.{ext}" for ext in ("md", "json"))
    written = re.search(r"Written by `(python benchmarks/[^`]+)`", md.read_text())
    assert written is not None, f"{md.name} does not state the command that wrote it"
    assert written.group(1).split()[1] == f"benchmarks/{script}"
    assert "--quick" not in written.group(1)
    assert json.loads(js.read_text())["command"] == written.group(1)


def test_quick_never_writes_the_committed_results(tmp_path: Path) -> None:
    import argparse

    reporting = _load("bench_reporting", ROOT / "benchmarks" / "reporting.py")
    parser = argparse.ArgumentParser()
    reporting.add_output_options(parser)
    assert reporting.output_dir(parser, parser.parse_args([])) == RESULTS
    assert reporting.output_dir(parser, parser.parse_args(["--quick", "--out", str(tmp_path)])) == tmp_path
    quick_tmp = reporting.output_dir(parser, parser.parse_args(["--quick"]))
    assert quick_tmp != RESULTS and quick_tmp.is_dir()
    quick_tmp.rmdir()
    with pytest.raises(SystemExit):
        reporting.output_dir(parser, parser.parse_args(["--quick", "--out", str(RESULTS)]))


@pytest.mark.slow
def test_benchmarks_all_quick_writes_every_report(tmp_path: Path) -> None:
    """What CI runs: every CPU benchmark in its quick mode, through the one command, into a temporary folder."""
    before = {p.name: p.stat().st_mtime_ns for p in RESULTS.iterdir()}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "all", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=cpu_env(),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for script, outputs in CPU.items():
        for name in outputs:
            path = tmp_path / name
            assert path.is_file() and path.stat().st_size > 0, f"{script} did not write {name}"
        stem = Path(outputs[0]).stem
        written = re.search(r"Written by `(python benchmarks/[^`]+)`", (tmp_path / f"{stem}.md").read_text())
        assert written is not None and written.group(1).startswith(f"python benchmarks/{script} --quick")
        assert json.loads((tmp_path / f"{stem}.json").read_text())["command"] == written.group(1)
    for script, (_js, md) in SCRIPTS.items():  # ours: the exact command line
        assert f"Written by `python benchmarks/{script} --quick --out {tmp_path}`" in (tmp_path / md).read_text()
    assert {p.name: p.stat().st_mtime_ns for p in RESULTS.iterdir()} == before, "a quick run touched results/"


def test_a_script_still_runs_on_its_own(tmp_path: Path) -> None:
    """``python benchmarks/<script>.py`` (its folder on sys.path, not the package) keeps working."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/compute_budget.py", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=cpu_env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "compute_budget.md").is_file()


def test_the_studies_draw_disjoint_noise() -> None:
    """Each study's noise offset (``reporting.NOISE_OFFSETS``, added to a model's seed) is its own: no two studies, and
    no study and a run's own evaluations (seed + a few), draw the same noise for any seed a study uses."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from reporting import NOISE_OFFSETS
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    offsets = sorted(NOISE_OFFSETS.values())
    assert offsets[0] >= 1000, "an offset this small meets a run's own evaluation noise (seed + a few)"
    assert all(b - a >= 1000 for a, b in zip(offsets, offsets[1:], strict=False)), NOISE_OFFSETS
