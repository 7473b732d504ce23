"""Atomic writes: the old file or the new one, never half of one, and no temporary file left."""
from __future__ import annotations

import pytest

from src import atomic


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.txt"  # missing folders are created
    atomic.write_text(target, "first")
    atomic.write_text(target, "second")
    assert target.read_text() == "second" and sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.atomic_destination(target) as temporary:
            temporary.write_text("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
