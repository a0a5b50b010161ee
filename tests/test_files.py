"""Atomic writes: a file is complete or absent, never half written."""

from __future__ import annotations

import pytest

from ser_pipeline.files import atomic_path, atomic_write_text


def test_a_written_file_replaces_the_old_one_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "deep" / "result.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_partial_one(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_text("complete")
    with pytest.raises(OSError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert target.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_the_temporary_name_is_hidden_and_matches_no_suffix_glob(tmp_path):
    with atomic_path(tmp_path / "last.ckpt") as tmp:
        assert tmp.name.startswith(".tmp-")
        assert not list(tmp_path.glob("*.ckpt"))
