"""Atomic writes leave either the old file or the new one, never a partial file or a stray temporary."""

from __future__ import annotations

import json

import pytest

from manifold_fm.atomic import atomic_path, write_json_atomic, write_text_atomic


def test_writes_replace_and_leave_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "report.json"
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "grid.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer crashed"), atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp.name.startswith(".")
        tmp.write_bytes(b"half")
        raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
