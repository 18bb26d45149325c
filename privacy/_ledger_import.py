"""Importing a ledger: this folder continues another folder's ledger (`Ledger.import_from`).

The copy keeps the source's HMAC key and chain, so it verifies and spends exactly what the
source spent, with an 'import' entry appended. It is staged, database last: the copy is made
and its entry appended in a staging file, then the key and the new mark are put in place,
then the database, whose rename is the one step that makes the ledger appear. A crash before
it leaves a folder that refuses to train (a key and mark without a ledger), never an empty
ledger; the same import run again clears what it left and starts afresh.
"""

from __future__ import annotations

import json
import os
from contextlib import suppress

from confide.common.errors import LedgerError
from confide.common.files import write_atomic
from confide.privacy._ledger_files import LedgerFiles
from confide.privacy._ledger_format import EMPTY, KEY, MARK, Entry
from confide.privacy._ledger_mark import HeadMark, Marks
from confide.privacy._ledger_store import LedgerStore, append
from confide.privacy._ledger_verify import LedgerCheck


class LedgerImport:
    """An import into the ledger whose files are `files` from the one in `origin`."""

    def __init__(self, files: LedgerFiles, origin: LedgerFiles) -> None:
        self.files = files
        self.origin = origin

    def run(self) -> Entry:
        """Import `origin`'s verified ledger here; the 'import' entry. Nothing in `origin`
        changes."""
        files, origin = self.files, self.origin
        self.clear_cut_short()
        if files.taken():
            raise LedgerError(f"{files.root}: a ledger (or its key or mark) already exists")
        if not origin.exists():
            raise LedgerError(f"{origin.root}: no ledger there to import")
        problems = LedgerCheck(origin).verify(read_only=True)
        if problems:
            raise origin.tampered(problems)
        # The marks before the database: the copy may be ahead of them, not behind.
        key = origin.read_key()
        marks = HeadMark(origin).read_both()
        files.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            LedgerStore(origin).copy(files.staged_import)
            entry = self._append_import(key, marks)
            write_atomic(files.key_path, key, mode=0o600)
            HeadMark(files).write(key, entry.seq, entry.mac)
            os.replace(files.staged_import, files.path)
        except BaseException:  # a failure, not a crash: leave nothing half made behind
            with suppress(OSError, LedgerError):
                self.clear_cut_short()
            raise
        return entry

    def _append_import(self, key: bytes, marks: Marks) -> Entry:
        """Verify the staged copy against `origin`'s marks and append the import entry."""
        store = LedgerStore(self.files)
        staged = self.files.staged_import
        with store.connect(staged) as connection, store.writing(connection, "the import"):
            problems, entries, _ = LedgerCheck(self.origin).check(key, connection, marks)
            if problems:
                raise self.origin.tampered(problems)
            note = json.dumps({"from": str(self.origin.root.resolve()), "entries": len(entries)})
            entry = append(connection, key, kind="import", values=EMPTY | {"note": note})
        return entry

    def clear_cut_short(self) -> None:
        """Remove what an import cut short left here — its staged copy and the key and mark
        it put in place — but only if that key is `origin`'s (the same import run again):
        another ledger's key is never removed."""
        files, origin = self.files, self.origin
        if not files.import_cut_short():
            return
        if files.key_path.exists() and (
            not origin.key_path.is_file()
            or files.key_path.read_bytes() != origin.key_path.read_bytes()
        ):
            raise LedgerError(
                f"{files.root}: an import of another ledger than {origin.root} was cut short "
                f"here: run join again with the --ledger-from it named, or move {KEY}, {MARK} "
                f"and {files.staged_import.name} out of this folder"
            )
        for path in (files.mark_path, files.key_path, files.staged_import):  # the copy last
            path.unlink(missing_ok=True)
