"""JSON Lines records (``metrics.jsonl``): one JSON object per line, appended as a run goes; read back tolerating a
torn last line (a process killed mid-write)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL file (``[]`` if it does not exist; lines that do not parse are skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


__all__ = ["read_jsonl"]
