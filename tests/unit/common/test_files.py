"""Crash-safe writes: whole files only, the requested mode from the start."""

from __future__ import annotations

import os
import stat

import pytest

from confide.common.files import write_atomic


def test_writes_text_or_bytes_with_the_requested_mode(tmp_path):
    write_atomic(tmp_path / "a.txt", "hello")
    write_atomic(tmp_path / "key", b"\x00secret", 0o600)
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    assert (tmp_path / "key").read_bytes() == b"\x00secret"


def test_replaces_an_existing_file_and_leaves_no_temporary_files(tmp_path):
    write_atomic(tmp_path / "a.txt", "old")
    write_atomic(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "new"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    write_atomic(tmp_path / "a.txt", "old")

    def broken_fsync(_: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]
