"""Atomic file writes: a reader never sees a half-written file, and a crash never truncates an existing one.

Every writer in the project (checkpoints aside, which swap whole folders) goes through :func:`atomic_path`: the data
is written to a hidden temporary file in the target's folder, then renamed over the target (``os.replace`` is atomic
on POSIX and Windows within one filesystem). The temporary name keeps the target's suffix, so writers that infer the
format from it (matplotlib, PIL, ``np.savez``) behave as for the final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on error remove it.

    ``path``'s folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")
