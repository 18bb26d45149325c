"""The host's ledger index: where it lives, what it holds, and that writers do not collide."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from confide.privacy.ledger_index import (
    INDEX_ENV,
    LedgerIndex,
    LedgerIndexError,
    default_index_path,
)


def test_the_environment_names_the_index_else_the_xdg_state_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(INDEX_ENV, str(tmp_path / "mine.json"))
    assert default_index_path() == tmp_path / "mine.json"
    monkeypatch.delenv(INDEX_ENV)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_index_path() == tmp_path / "state" / "confide" / "ledgers.json"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert (
        default_index_path() == tmp_path / "home" / ".local" / "state" / "confide" / "ledgers.json"
    )


def test_folders_are_indexed_once_by_their_absolute_path(tmp_path, monkeypatch):
    index = LedgerIndex(tmp_path / "index" / "ledgers.json")
    monkeypatch.chdir(tmp_path)
    assert index.add("sha256:a", Path("hospital")) is True
    assert index.add("sha256:a", tmp_path / "hospital") is False
    assert index.folders("sha256:a") == [tmp_path / "hospital"] and index.folders("x") == []
    content = json.loads(index.path.read_text())
    assert content == {
        "format": "confide-ledger-index-v1",
        "ledgers": {"sha256:a": [str(tmp_path / "hospital")]},
    }
    assert stat.S_IMODE(index.path.stat().st_mode) == 0o600


def test_an_unreadable_index_is_refused_with_its_path(tmp_path):
    index = LedgerIndex(tmp_path / "ledgers.json")
    index.path.write_text('{"ledgers": []}')
    with pytest.raises(LedgerIndexError, match=str(index.path)):
        index.folders("sha256:a")


ADDER = textwrap.dedent(
    """
    import sys
    from confide.privacy.ledger_index import LedgerIndex
    index = LedgerIndex(sys.argv[1])
    for n in range(60):
        index.add("sha256:a", f"/srv/{sys.argv[2]}-{n}")
    """
)


def test_concurrent_writers_lose_no_folder(tmp_path):
    path = tmp_path / "ledgers.json"
    writers = [subprocess.Popen([sys.executable, "-c", ADDER, str(path), name]) for name in "ab"]
    assert [writer.wait(timeout=60) for writer in writers] == [0, 0]
    assert len(LedgerIndex(path).folders("sha256:a")) == 120
