"""The ledger's SQLite database: connections, write transactions, reading and appending rows,
and the translation of SQLite's errors.

Each write is one SQLite transaction (journal, full fsync), so a crash leaves the ledger
either before or after the entry, never in between. SQLite's errors are sorted by their
result code, never by their message: damaged or foreign content is LedgerTampered, an
environment that stops the ledger's use (a read-only or full disk, another process) a
LedgerError naming the cause, fixed without an operator's reseal.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from confide.common.errors import LedgerError, LedgerTampered
from confide.privacy._ledger_files import LedgerFiles
from confide.privacy._ledger_format import (
    COLUMN_TYPES,
    FIELDS,
    SCHEMA,
    Entry,
    genesis,
    head_mac,
    mac,
    now,
)

# SQLite's primary result codes that say the environment stopped the ledger's use (its file
# system, another process, memory, permissions), not that its content is wrong: each is a
# LedgerError naming the cause, and is fixed without a reseal. Sorting errors by their text
# used to report "attempt to write a readonly database" as tampering.
_UNAVAILABLE = {
    sqlite3.SQLITE_READONLY: "the database is read-only for this process (its file, folder or "
    "file system)",
    sqlite3.SQLITE_CANTOPEN: "the database file cannot be opened",
    sqlite3.SQLITE_BUSY: "another process is using the database",
    sqlite3.SQLITE_LOCKED: "the database is locked",
    sqlite3.SQLITE_FULL: "the disk is full or the write failed",
    sqlite3.SQLITE_IOERR: "the disk is full or the write failed",
    sqlite3.SQLITE_NOMEM: "out of memory",
    sqlite3.SQLITE_PERM: "the operating system denied access to the database",
    sqlite3.SQLITE_AUTH: "access to the database was denied",
}
# Codes that say the content is not the ledger it should be: damaged or replaced (CORRUPT,
# NOTADB) or of another shape (ERROR: "no such table", a column missing; CONSTRAINT and
# MISMATCH: rows that the schema refuses).
_DAMAGED = (
    sqlite3.SQLITE_CORRUPT,
    sqlite3.SQLITE_NOTADB,
    sqlite3.SQLITE_ERROR,
    sqlite3.SQLITE_CONSTRAINT,
    sqlite3.SQLITE_MISMATCH,
)


def cause(error: sqlite3.Error) -> str | None:
    """What in the environment made `error` (see `_UNAVAILABLE`); None if it says the content
    is damaged (`_DAMAGED`). Classified by SQLite's result code, never by the message."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:  # raised by Python's sqlite3 module reading the content (e.g. text that
        return None  # is not UTF-8): what the rows hold, not the environment
    if code & 0xFF in _DAMAGED:
        return None
    if code & 0xFF == sqlite3.SQLITE_IOERR and "READ" in (error.sqlite_errorname or ""):
        return "a read from the disk failed"
    return _UNAVAILABLE.get(code & 0xFF, "SQLite could not use the database")


def describe(error: sqlite3.Error) -> str:
    """The error as SQLite names it: `message (SQLITE_NAME)`."""
    return f"{error} ({getattr(error, 'sqlite_errorname', None) or type(error).__name__})"


def entries(connection: sqlite3.Connection) -> list[Entry]:
    """Every entry as stored, in sequence order (unverified)."""
    columns = ", ".join((*FIELDS, "mac"))
    rows = connection.execute(f"SELECT {columns} FROM entries ORDER BY seq").fetchall()
    return [Entry.from_row(row) for row in rows]


def start_chain(connection: sqlite3.Connection, key: bytes) -> str:
    """A head record for a new, empty chain under a new random ledger id; its genesis MAC."""
    ledger_id, created_at = secrets.token_hex(16), now()
    first = genesis(key, ledger_id)
    connection.execute(
        "INSERT INTO head VALUES (1, ?, ?, 0, ?, ?)",
        (
            ledger_id,
            created_at,
            first,
            head_mac(key, ledger_id=ledger_id, created_at=created_at, count=0, last_mac=first),
        ),
    )
    return first


def append(
    connection: sqlite3.Connection,
    key: bytes,
    *,
    kind: str,
    values: dict[str, object],
    recorded_at: str | None = None,
) -> Entry:
    """Append one entry and move the head, inside the caller's transaction."""
    ledger_id, created_at, count, last_mac = connection.execute(
        "SELECT ledger_id, created_at, count, last_mac FROM head WHERE id = 1"
    ).fetchone()
    fields = {"seq": count + 1, "recorded_at": recorded_at or now(), "kind": kind} | values
    # As SQLite will store them (an int in a REAL column comes back a float): the MAC
    # must cover what verification will read.
    ordered = tuple(COLUMN_TYPES[name](fields[name]) for name in FIELDS)
    entry_mac = mac(key, last_mac, ordered)
    placeholders = ", ".join("?" * (len(FIELDS) + 1))
    connection.execute(f"INSERT INTO entries VALUES ({placeholders})", (*ordered, entry_mac))
    connection.execute(
        "UPDATE head SET count = ?, last_mac = ?, mac = ? WHERE id = 1",
        (
            count + 1,
            entry_mac,
            head_mac(
                key, ledger_id=ledger_id, created_at=created_at, count=count + 1, last_mac=entry_mac
            ),
        ),
    )
    return Entry.from_row((*ordered, entry_mac))


def create_database(target: Path, key: bytes) -> str:
    """A new database with an empty chain at `target` (a staging file, mode 0600 from the
    start); the chain's genesis MAC."""
    target.unlink(missing_ok=True)
    os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
    connection = sqlite3.connect(target, isolation_level=None)
    try:
        connection.executescript(SCHEMA)
        return start_chain(connection, key)
    finally:
        connection.close()


class LedgerStore:
    """The database of the ledger whose files are `files`."""

    def __init__(self, files: LedgerFiles) -> None:
        self.files = files

    @contextmanager
    def connect(self, path: Path | None = None) -> Iterator[sqlite3.Connection]:
        """A connection to the database (or to `path`, a staged copy). SQLite's errors are
        sorted by their result code (`cause`): damaged or foreign content is LedgerTampered,
        anything else a LedgerError naming the cause."""
        path = path or self.files.path
        uri = path.resolve().as_uri() + "?mode=rw"
        try:
            connection = sqlite3.connect(uri, uri=True, timeout=30.0)
        except sqlite3.Error as error:
            raise self._error(error, path) from error
        connection.isolation_level = None  # explicit transactions below
        try:
            # EXTRA also syncs the directory after the journal is deleted: a power loss right
            # after a commit cannot undo it (and leave the mark ahead of the database).
            connection.execute("PRAGMA synchronous = EXTRA")
            yield connection
        except sqlite3.Error as error:
            raise self._error(error, path) from error
        finally:
            connection.close()

    def _error(self, error: sqlite3.Error, path: Path) -> LedgerError:
        found = cause(error)
        if found is None:
            problem = f"not a readable ledger database: {describe(error)}"
            return self.files.tampered([problem])
        return LedgerError(f"{path}: cannot use the ledger now: {found}: {describe(error)}")

    @contextmanager
    def writing(self, connection: sqlite3.Connection, what: str) -> Iterator[None]:
        """One write transaction (one writer; readers see the ledger before or after it).

        On a full disk or a failed write SQLite rolls the transaction back by itself, so it is
        rolled back here only while still open (a ROLLBACK with none open fails, and that
        failure used to be reported as tampering). A write the environment stops (`cause`:
        a full or read-only disk, another process) or a file staged beside the ledger that
        cannot be written is a LedgerError saying so and that the ledger is unchanged.
        """
        try:
            connection.execute("BEGIN IMMEDIATE")
            yield
            connection.execute("COMMIT")
        except (sqlite3.Error, OSError) as error:
            _roll_back(connection)
            if isinstance(error, sqlite3.Error):
                reason, detail = cause(error), describe(error)
                if reason is None:
                    raise
            else:
                reason, detail = "a file beside the ledger could not be written", str(error)
            raise LedgerError(
                f"{self.files.path}: {reason} ({detail}); {what} was not recorded and the "
                "ledger is unchanged. Fix that (free space on this disk, make the ledger "
                "writable for this user, or stop the other process using it), then try again."
            ) from error
        except BaseException:
            _roll_back(connection)
            raise

    def copy(self, target: Path) -> None:
        """A consistent copy of the database (SQLite's backup API), mode 0600 from the start."""
        target.unlink(missing_ok=True)
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
        copy = sqlite3.connect(target)
        try:
            with self.connect() as connection:
                connection.backup(copy)
        finally:
            copy.close()

    def empty(self) -> bool:
        """The database holds a head for no entries and no entry (False if it cannot be read)."""
        try:
            with self.connect() as connection:
                head = connection.execute("SELECT count FROM head WHERE id = 1").fetchone()
                rows = connection.execute("SELECT count(*) FROM entries").fetchone()
            return head is not None and head[0] == 0 and rows[0] == 0
        except LedgerError:
            return False

    def readable(self) -> bool:
        """The database reads as a ledger (an environment that stops it is a LedgerError)."""
        try:
            with self.connect() as connection:
                entries(connection)
                return connection.execute("SELECT count(*) FROM head").fetchone() is not None
        except LedgerTampered:
            return False


def _roll_back(connection: sqlite3.Connection) -> None:
    if connection.in_transaction:
        with suppress(sqlite3.Error):  # closing the connection discards it anyway
            connection.execute("ROLLBACK")
