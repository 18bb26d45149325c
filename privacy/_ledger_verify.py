"""Verification of a ledger: its chain of entries, its head record and its mark, checked
together in one read of the database.

Entry i verifies when mac_i = HMAC-SHA256(key, mac_{i-1} || canonical(entry i)) with mac_0
derived from the ledger's id; the head record (count, mac_n) under its own HMAC shows entries
deleted from the end, and the mark outside the database an older copy restored (see
`confide.privacy.ledger`). Every read and every append checks this first.
"""

from __future__ import annotations

import sqlite3

from confide.common.errors import LedgerTampered
from confide.privacy._ledger_create import LedgerCreation
from confide.privacy._ledger_files import LedgerFiles
from confide.privacy._ledger_format import FIELDS, Entry, genesis, head_mac, mac, same
from confide.privacy._ledger_mark import HeadMark, Marks
from confide.privacy._ledger_store import LedgerStore, entries


def chain_problems(key: bytes, connection: sqlite3.Connection) -> tuple[list[str], list[Entry]]:
    """Chain and head problems; the caller holds a transaction, so head and entries are
    one snapshot."""
    head = connection.execute(
        "SELECT ledger_id, created_at, count, last_mac, mac FROM head WHERE id = 1"
    ).fetchone()
    stored = entries(connection)
    if head is None:
        return ["the ledger's head record is missing"], stored
    ledger_id, created_at, count, last_mac, stored_head_mac = head
    problems = []
    if not same(
        stored_head_mac,
        head_mac(key, ledger_id=ledger_id, created_at=created_at, count=count, last_mac=last_mac),
    ):
        problems.append("the head record was altered (or the key replaced)")
    previous = genesis(key, ledger_id)
    for position, entry in enumerate(stored, start=1):
        if entry.seq != position:
            problems.append(f"entry {position} is missing or out of order (found seq {entry.seq})")
        values = tuple(getattr(entry, name) for name in FIELDS)
        if not same(entry.mac, mac(key, previous, values)):
            problems.append(f"entry {entry.seq} was altered, moved or follows a deleted one")
        previous = entry.mac if isinstance(entry.mac, str) else ""
    if count != len(stored) or not same(last_mac, previous):
        problems.append(
            f"the head records {count} entries and {len(stored)} are present "
            "(entries deleted, or an older copy restored)"
            if count != len(stored)
            else "the newest entry does not match the head"
        )
    return problems, stored


class LedgerCheck:
    """Verifying the ledger whose files are `files`."""

    def __init__(self, files: LedgerFiles) -> None:
        self.files = files
        self.mark = HeadMark(files)

    def check(
        self, key: bytes, connection: sqlite3.Connection, marks: Marks
    ) -> tuple[list[str], list[Entry], str | None]:
        """Chain, head and mark problems in the caller's transaction, and the staged mark to
        put in place if it is the one that fits.

        `marks` are the mark and a reseal's staged mark, read before the transaction. A
        reseal stages its mark before its commit and puts it in place after: if it was cut
        short in between, the old mark no longer fits the re-signed chain but the staged one
        does (it is signed with the key and names an entry of this chain), and is accepted —
        never when the old mark shows the database behind it (that is a rollback to report).
        """
        problems, stored = chain_problems(key, connection)
        mark, staged = marks
        found, behind = self.mark.state(key, stored, mark)
        if found and not behind and self.mark.staged_fits(key, stored, staged):
            return problems, stored, staged
        return problems + found, stored, None

    def snapshot(self, key: bytes, *, read_only: bool = False) -> tuple[list[str], list[Entry]]:
        """Every problem and every entry: the marks first, then one read transaction. A
        reseal's staged mark that fits (`check`) is put in place unless `read_only`."""
        marks = self.mark.read_both()
        with LedgerStore(self.files).connect() as connection:
            connection.execute("BEGIN")
            problems, stored, staged = self.check(key, connection, marks)
            connection.execute("COMMIT")
        if staged is not None and not read_only:
            self.mark.adopt(staged)
        return problems, stored

    def verify(self, *, read_only: bool = False) -> list[str]:
        """Every integrity problem found (empty: the ledger is intact); `read_only` changes no
        file (see `Ledger.verify`)."""
        creation = LedgerCreation(self.files)
        if not read_only:
            creation.recover()
        absence = creation.absence()
        if absence is not None:
            return absence
        if read_only and creation.pending():
            return []
        try:
            return self.snapshot(self.files.read_key(), read_only=read_only)[0]
        except LedgerTampered as error:
            return error.problems

    def entries(self, *, read_only: bool = False) -> list[Entry]:
        """Every entry, after verifying the whole chain (see `Ledger.entries`)."""
        creation = LedgerCreation(self.files)
        if not read_only:
            creation.open()
        elif (absence := creation.absence()) is not None or creation.pending():
            if absence:
                raise self.files.tampered(absence)
            return []
        problems, stored = self.snapshot(self.files.read_key(), read_only=read_only)
        if problems:
            raise self.files.tampered(problems)
        return stored
