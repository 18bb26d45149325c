"""Resealing a ledger: an operator accepts it as it now stands (`Ledger.reseal`).

Every entry is kept as stored and re-signed in sequence order under a new ledger id, and a
'reseal' entry records the reason and the problems found. Its mark (and a new key, when the
old one is missing or damaged) is staged before the commit and put in place after it, the
key first: a reseal cut short after its commit still verifies (the staged mark fits), except
before a new key was in place — the ledger then reports its key missing until the reseal is
run again, since a key beside a ledger with entries is never adopted by itself.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from pathlib import Path

from confide.common.errors import LedgerError, LedgerTampered
from confide.common.files import write_atomic
from confide.privacy._ledger_create import LedgerCreation
from confide.privacy._ledger_files import LedgerFiles
from confide.privacy._ledger_format import EMPTY, FIELDS, Entry
from confide.privacy._ledger_mark import HeadMark
from confide.privacy._ledger_store import LedgerStore, append, entries, start_chain
from confide.privacy._ledger_verify import LedgerCheck


class LedgerReseal:
    """A reseal of the ledger whose files are `files`."""

    def __init__(self, files: LedgerFiles) -> None:
        self.files = files

    def run(self, reason: str) -> list[str]:
        """Reseal with `reason`; the problems found (and recorded in the 'reseal' entry)."""
        files = self.files
        if not reason.strip():
            raise LedgerError("a reseal needs a reason (it is recorded in the ledger)")
        problems = LedgerCheck(files).verify()
        if not files.exists():  # deleted: start again, saying so in the first entry
            files.key_path.unlink(missing_ok=True)
            files.mark_path.unlink(missing_ok=True)
            LedgerCreation(files).create()
        store = LedgerStore(files)
        if not store.readable():
            raise LedgerError(
                f"{files.path} is not a readable SQLite database: restore it from a backup, or "
                f"move it and {files.key_path} away to start a new, empty ledger"
            )
        key, new_key = self._key()
        with store.connect() as connection, store.writing(connection, "the reseal"):
            last = self._resign(
                connection, key, json.dumps({"reason": reason, "problems": problems})
            )
            HeadMark(files).stage(key, last.seq, last.mac)
        self._finish(new_key)
        return problems

    def _key(self) -> tuple[bytes, bool]:
        """The key to re-sign with: the ledger's, else (missing or damaged) a new one, staged
        beside it (True)."""
        try:
            return self.files.read_key(), False
        except LedgerTampered:
            key = secrets.token_bytes(32)
            try:
                write_atomic(self.files.staged_key, key, mode=0o600)
            except OSError as error:
                raise LedgerError(
                    f"{self.files.staged_key}: cannot write a new key ({error}); the reseal was "
                    "not recorded and the ledger is unchanged"
                ) from error
            return key, True

    @staticmethod
    def _resign(connection: sqlite3.Connection, key: bytes, note: str) -> Entry:
        """In the reseal's transaction: every entry re-signed in order under a new ledger id,
        then the 'reseal' entry with `note`."""
        stored = entries(connection)
        connection.execute("DELETE FROM entries")
        connection.execute("DELETE FROM head")
        start_chain(connection, key)
        for entry in stored:
            values = {name: getattr(entry, name) for name in FIELDS[3:]}
            append(connection, key, kind=entry.kind, values=values, recorded_at=entry.recorded_at)
        return append(connection, key, kind="reseal", values=EMPTY | {"note": note})

    def _finish(self, new_key: bool) -> None:
        """After the reseal's commit: a new key, then the staged mark, put in place."""
        if new_key:
            self._put_in_place(
                self.files.staged_key,
                self.files.key_path,
                "Until it is in place, the ledger fails verification (its key is missing or "
                "damaged): fix the cause, then run the reseal again.",
            )
        self._put_in_place(
            self.files.staged_mark,
            self.files.mark_path,
            "Its key is in place and the ledger verifies (the staged mark fits it and is "
            "accepted); the next use puts the mark in place once the cause is fixed.",
        )

    def _put_in_place(self, staged: Path, final: Path, state: str) -> None:
        """One rename after a reseal's commit; a failure says what state the ledger is in."""
        try:
            os.replace(staged, final)
        except OSError as error:
            raise LedgerError(
                f"{self.files.path}: the reseal was recorded, but {staged.name} could not "
                f"replace {final} ({error}). {state}"
            ) from error
