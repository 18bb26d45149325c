"""A ledger's creation, and what a ledger folder holds before it is used.

A new ledger is staged (database, key and mark) and put in place database first: a crash
leaves no ledger (it is created again) or an empty one whose staged key and mark are put in
place on its next use. A folder whose database is gone while its key or mark remains (a
ledger deleted, or an import cut short) is never given a new, empty ledger in its place.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from confide.common.errors import LedgerError
from confide.common.files import write_atomic
from confide.privacy._ledger_files import LedgerFiles
from confide.privacy._ledger_mark import HeadMark
from confide.privacy._ledger_store import LedgerStore, create_database


class LedgerCreation:
    """Creating the ledger whose files are `files`, and recovering a creation cut short."""

    def __init__(self, files: LedgerFiles) -> None:
        self.files = files

    def create(self) -> None:
        """Make a new, empty ledger, its mark and its key. All three are staged first, then
        put in place database first: a crash leaves no ledger (it is created again) or an
        empty one whose staged files `recover` puts in place."""
        files = self.files
        if files.taken():
            raise LedgerError(f"{files.root}: a ledger (or its key or mark) already exists")
        files.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = secrets.token_bytes(32)
        last = create_database(files.staged_database, key)
        write_atomic(files.staged_key, key, mode=0o600)
        HeadMark(files).stage(key, 0, last)
        os.replace(files.staged_database, files.path)
        os.replace(files.staged_mark, files.mark_path)
        os.replace(files.staged_key, files.key_path)

    def pending(self) -> list[tuple[Path, Path]]:
        """The staged (file, final name) pairs of a `create` cut short after its database
        appeared — only while that database is still empty (a ledger with entries is no
        creation, and a key planted beside it must not be adopted)."""
        files = self.files
        pending = [
            (staged, final)
            for staged, final in (
                (files.staged_mark, files.mark_path),
                (files.staged_key, files.key_path),
            )
            if staged.is_file() and not final.exists()
        ]
        if not pending or not files.exists() or not LedgerStore(files).empty():
            return []
        return pending

    def recover(self) -> None:
        """Finish a `create` cut short after its database appeared (`pending`)."""
        for staged, final in self.pending():
            os.replace(staged, final)

    def absence(self) -> list[str] | None:
        """None if the database is here; else the problems its absence makes: none when the
        folder never had a ledger, one when its key or mark remain (a ledger deleted, or an
        import cut short)."""
        files = self.files
        if files.exists():
            return None
        left = [path.name for path in (files.key_path, files.mark_path) if path.exists()]
        if not left:
            return []
        problem = f"{files.path} is missing but its {' and '.join(left)} exist"
        if files.import_cut_short():
            problem += " (an import cut short: run the same `join --ledger-from` again)"
        return [problem]

    def open(self) -> None:
        """Create the ledger if this directory never had one; refuse if it had one that is
        gone (its key or mark is still here), or while an import into it is unfinished."""
        self.recover()
        absence = self.absence()
        if absence:
            raise self.files.tampered(absence)
        if absence is not None:
            if self.files.import_cut_short():
                raise LedgerError(
                    f"{self.files.root}: an import of another ledger into this folder was cut "
                    f"short (its copy {self.files.staged_import.name} is here): run the same "
                    "`confide-client join --ledger-from` again"
                )
            self.create()
