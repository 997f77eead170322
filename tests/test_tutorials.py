"""Every tutorial page (and the landing page's quick start) runs as written: its ```python blocks are executed in
order in one fresh namespace.

A tutorial is documentation *and* a test: if an API it uses changes, or one of its ``assert``s stops holding, this
fails. Blocks fenced as ```text, ```bash etc. are not executed. Each page runs in its own temporary directory
(anything it writes stays there) with one torch thread (conftest's autouse fixture), which is the fastest setting
for these tiny models on a shared 2-core machine.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
TUTORIALS = DOCS / "tutorials"
# Every tutorial, plus the landing page's quick-start snippet.
# your-data.md is a command-line page: tests/test_tutorial_your_data.py runs its commands, then its python block.
PAGES = [DOCS / "index.md", *sorted(p for p in TUTORIALS.glob("*.md") if p.name not in ("index.md", "your-data.md"))]

# A fenced block opened by ```python (no indentation: blocks inside admonitions are illustrations, not steps).
_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks(markdown: str) -> list[str]:
    """The bodies of the top-level ```python fenced blocks of a Markdown page, in order."""
    return [m.group(1) for m in _BLOCK.finditer(markdown)]


def test_block_extraction() -> None:
    page = "intro\n```python\na = 1\n```\ntext\n```bash\nrm -rf /\n```\n```python title='x'\nb = a + 1\n```\n"
    assert python_blocks(page) == ["a = 1\n", "b = a + 1\n"]


def test_there_are_tutorials() -> None:
    assert {p.stem for p in PAGES} >= {"sphere-s2", "custom-manifold", "tokenizer"}


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(DOCS).with_suffix("").as_posix() for p in PAGES])
def test_tutorial_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(page.read_text())
    assert blocks, f"{page.name} has no ```python blocks"
    assert any("assert " in b for b in blocks), f"{page.name} checks nothing: add an assert on a real result"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"tutorial_{page.stem.replace('-', '_')}"}
    start = time.perf_counter()
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page.name}[block {i + 1}]", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{page.name}, python block {i + 1} failed: {exc!r}\n---\n{code}") from exc
    print(f"{page.name}: {len(blocks)} blocks in {time.perf_counter() - start:.1f} s")
