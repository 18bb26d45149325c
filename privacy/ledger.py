"""An institution's privacy ledger: every DP-SGD release ever made from its data.

Why a ledger: an accountant lives inside one run, but a dataset's privacy loss composes over
every run that ever trained on it. The ledger keeps each round's mechanism parameters (not
epsilons, which do not add up) so the cumulative spend of a dataset is recomputed from its
whole history with the RDP accountant:

    eps_RDP(alpha) = sum over entries e of dataset D:  e.steps * eps_alpha(e.sample_rate, e.sigma)
    epsilon(D, delta) = min over alpha of the (epsilon, delta) conversion of eps_RDP(alpha)

RDP composes entries with different sigma, q and delta-of-the-job alike; the cumulative
figure is stated at the delta the institution chooses (its policy's `max_delta`).

Storage: `ledger.sqlite` and `ledger.key` (32 random bytes), both mode 0600, in the
institution's state directory. Each write is one SQLite transaction (journal, full fsync), so
a crash leaves the ledger either before or after the entry, never in between.

Integrity: entry i carries mac_i = HMAC-SHA256(key, mac_{i-1} || canonical(entry i)), with
mac_0 derived from the ledger's random id, and a `head` row holds (count, mac_n) under its own
HMAC. Editing any field breaks mac_i; deleting or reordering entries breaks the chain or the
sequence; deleting the newest entries no longer matches the head; deleting the database while
its key remains is reported too. The key lives beside the ledger: this protects against
mistakes, restores of an old copy, and tools or people that can write the database but not
read the key. It cannot stop someone who holds the key (the institution's own administrator);
see docs/privacy.md.

Entries other than kind 'spend' carry no spend (their spend fields are empty) and are what
operators did: 'reseal' (accepted the ledger as it stood), 'import' (this folder continues
another folder's ledger), 'moved' (another folder continues this one: no spend is recorded
here any more) and 'new-budget' (a new budget on data another ledger had spent on, with the
reason). A 'refused-app' entry records what the institution itself refused: a run whose app
was not confide's own ClientApp (`confide.client.runner`; its run id, FAB hash and the
reason in the note), so that the refusal stays on record beside the spend. Only 'spend'
entries count towards epsilon.

Errors: LedgerTampered when the content fails verification (or is no ledger database at
all); LedgerError, naming the cause, when the environment stops its use (a read-only or full
disk, another process holding it): those are fixed without an operator's reseal.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from confide.common.errors import LedgerError, LedgerTampered
from confide.common.files import write_atomic
from confide.privacy.accounting import HistoryEntry, epsilon

LEDGER = "ledger.sqlite"
KEY = "ledger.key"
MARK = "ledger.head"
# The name spend is recorded under unless an institution names its data otherwise.
DEFAULT_DATASET = "default"
_FORMAT = "confide-ledger-v1"
# Every column an entry's MAC covers, in MAC order.
_FIELDS = (
    "seq",
    "recorded_at",
    "kind",
    "dataset",
    "fingerprint",
    "job",
    "run",
    "round",
    "examples",
    "sample_rate",
    "noise_multiplier",
    "steps",
    "delta",
    "accountant",
    "note",
)
_SCHEMA = """
CREATE TABLE entries (
    seq INTEGER PRIMARY KEY,
    recorded_at TEXT NOT NULL,
    kind TEXT NOT NULL,
    dataset TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    job TEXT NOT NULL,
    run TEXT NOT NULL,
    round INTEGER NOT NULL,
    examples INTEGER NOT NULL,
    sample_rate REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    steps INTEGER NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    note TEXT NOT NULL,
    mac TEXT NOT NULL
);
CREATE TABLE head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    ledger_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    count INTEGER NOT NULL,
    last_mac TEXT NOT NULL,
    mac TEXT NOT NULL
);
"""


_REAL = {"sample_rate", "noise_multiplier", "delta"}
_INTEGER = {"seq", "round", "examples", "steps"}
_COLUMN_TYPES = {
    name: float if name in _REAL else int if name in _INTEGER else str for name in _FIELDS
}
# Kinds of the entries an operator's action writes (no spend; see the module's docstring).
OPERATOR_KINDS = ("reseal", "import", "moved", "new-budget")
# Kinds the institution records by itself that change nothing about the data's ledger (no
# spend, no operator's decision): an app it refused to run (`record_refusal`).
REFUSED_APP = "refused-app"
EVENT_KINDS = (REFUSED_APP,)
# Their spend fields.
_EMPTY: dict[str, object] = {
    "dataset": "",
    "fingerprint": "",
    "job": "",
    "run": "",
    "round": 0,
    "examples": 0,
    "sample_rate": 0.0,
    "noise_multiplier": 0.0,
    "steps": 0,
    "delta": 0.0,
    "accountant": "",
}


@dataclass(frozen=True)
class Spend:
    """One round of DP-SGD on one dataset: the mechanism, not its epsilon.

    `noise_multiplier` 0 records training without DP (an unbounded spend).
    """

    dataset: str
    fingerprint: str
    job: str
    run: str
    round: int
    examples: int
    sample_rate: float
    noise_multiplier: float
    steps: int
    delta: float
    accountant: str

    @property
    def history_entry(self) -> HistoryEntry:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class Entry(Spend):
    """A ledger row as stored: a spend, an operator's action (`OPERATOR_KINDS`, see `note`)
    or an event the institution recorded (`EVENT_KINDS`, see `record_refusal`)."""

    seq: int
    recorded_at: str
    kind: str
    note: str
    mac: str

    @classmethod
    def from_row(cls, row: tuple[object, ...]) -> Entry:
        return cls(**dict(zip((*_FIELDS, "mac"), row, strict=True)))  # type: ignore[arg-type]


@dataclass(frozen=True)
class DatasetSpend:
    """What a dataset has spent over every job, at `delta`."""

    dataset: str
    epsilon: float
    delta: float
    rounds: int
    jobs: int
    fingerprints: tuple[str, ...]
    accountant: str = "rdp"  # the accountant that composed `epsilon`


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _mac(key: bytes, previous: str, values: tuple[object, ...]) -> str:
    message = previous.encode() + json.dumps(values, separators=(",", ":")).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _mark_text(key: bytes, count: int, last_mac: str) -> str:
    mark = {"count": count, "last_mac": last_mac, "mac": _mac(key, "mark", (count, last_mac))}
    return json.dumps(mark) + "\n"


def _genesis(key: bytes, ledger_id: str) -> str:
    return _mac(key, "", (_FORMAT, ledger_id))


def _head_mac(key: bytes, ledger_id: str, created_at: str, count: int, last_mac: str) -> str:
    return _mac(key, "head", (_FORMAT, ledger_id, created_at, count, last_mac))


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


def _same(stored: object, expected: str) -> bool:
    """A stored MAC equals the expected one (in constant time); a value that is no text at
    all (a BLOB or NULL written into the column) is simply not equal."""
    return isinstance(stored, str) and hmac.compare_digest(stored, expected)


def _cause(error: sqlite3.Error) -> str | None:
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


def _describe(error: sqlite3.Error) -> str:
    """The error as SQLite names it: `message (SQLITE_NAME)`."""
    return f"{error} ({getattr(error, 'sqlite_errorname', None) or type(error).__name__})"


def moved_to(entries: list[Entry]) -> str | None:
    """Where the ledger went if its newest entry other than a reseal or an event is 'moved'
    (neither a reseal nor a refused app brings a moved ledger back); None if it was not moved."""
    for entry in reversed(entries):
        if entry.kind == "reseal" or entry.kind in EVENT_KINDS:
            continue
        if entry.kind != "moved":
            return None
        try:
            return str(json.loads(entry.note)["to"])
        except (ValueError, KeyError, TypeError):
            return entry.note
    return None


def fingerprint_bytes(*parts: bytes) -> str:
    """Content hash of a dataset: SHA-256 over its bytes (for arrays, their raw buffers)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return "sha256:" + digest.hexdigest()


def fingerprint_file(path: Path) -> str:
    """Content hash of a data file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


class Ledger:
    """The ledger in `root` (an institution's state directory); created on first use."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    path = property(lambda self: self.root / LEDGER)
    key_path = property(lambda self: self.root / KEY)
    mark_path = property(lambda self: self.root / MARK)
    # Staged beside the ledger: a new key and mark (`create`, `reseal`) and the copy an
    # import is made in (`import_from`), each put in place by a rename.
    _staged_key = property(lambda self: self.root / f".{KEY}.new")
    _staged_mark = property(lambda self: self.root / f".{MARK}.new")
    _staged_import = property(lambda self: self.root / f".{LEDGER}.import")

    # -- files ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.path.is_file()

    def _key(self) -> bytes:
        try:
            key = self.key_path.read_bytes()
        except FileNotFoundError:
            problem = f"the ledger's key {self.key_path} is missing"
            if self._staged_key.is_file():  # a creation's is put in place before this read
                problem += (
                    f" (the key staged beside it, {self._staged_key.name}, left by a reseal cut "
                    "short or planted, is never adopted by itself: run the reseal again)"
                )
            raise LedgerTampered(self.root / LEDGER, [problem]) from None
        except OSError as error:
            raise LedgerError(f"{self.key_path}: cannot read the ledger key: {error}") from None
        if len(key) != 32:
            raise LedgerTampered(self.root / LEDGER, [f"{self.key_path} is not a 32-byte key"])
        return key

    def create(self) -> None:
        """Make a new, empty ledger, its mark and its key. All three are staged first, then
        put in place database first: a crash leaves no ledger (it is created again) or an
        empty one whose staged files `_recover_creation` puts in place."""
        if self.exists() or self.key_path.exists() or self.mark_path.exists():
            raise LedgerError(f"{self.root}: a ledger (or its key or mark) already exists")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = secrets.token_bytes(32)
        ledger_id, created_at = secrets.token_hex(16), _now()
        staging = self.root / f".{LEDGER}.new"
        staging.unlink(missing_ok=True)
        os.close(os.open(staging, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
        connection = sqlite3.connect(staging, isolation_level=None)
        try:
            connection.executescript(_SCHEMA)
            last = _genesis(key, ledger_id)
            connection.execute(
                "INSERT INTO head VALUES (1, ?, ?, 0, ?, ?)",
                (ledger_id, created_at, last, _head_mac(key, ledger_id, created_at, 0, last)),
            )
        finally:
            connection.close()
        write_atomic(self._staged_key, key, mode=0o600)
        write_atomic(self._staged_mark, _mark_text(key, 0, last), mode=0o600)
        os.replace(staging, self.path)
        os.replace(self._staged_mark, self.mark_path)
        os.replace(self._staged_key, self.key_path)

    def _write_mark(self, key: bytes, count: int, last_mac: str) -> None:
        """Record the newest (count, mac) outside the database, after each commit: a copy of
        the database alone restored from an older backup is then behind its mark."""
        write_atomic(self.mark_path, _mark_text(key, count, last_mac), mode=0o600)

    def _read_mark(self, path: Path | None = None) -> str | None:
        """The mark's text (None if missing, "" if not a readable text file); `path` reads a
        staged mark instead. Read before the database, so that a commit in between leaves the
        database ahead of it, which verification accepts."""
        path = path or self.mark_path
        try:
            return path.read_text()
        except FileNotFoundError:
            return None
        except PermissionError as error:  # the environment, not the content
            raise LedgerError(f"{path}: cannot read the ledger's mark: {error}") from None
        except (OSError, UnicodeDecodeError):
            return ""

    def _mark_state(
        self, key: bytes, entries: list[Entry], text: str | None
    ) -> tuple[list[str], bool]:
        """The problems of the mark `text`, and whether it shows the database behind it (an
        older copy restored, or entries deleted)."""
        if text is None:
            return [f"{self.mark_path} (the record of the newest entry) is missing"], False
        try:
            mark = json.loads(text)
            count, last_mac = int(mark["count"]), str(mark["last_mac"])
            valid = hmac.compare_digest(str(mark["mac"]), _mac(key, "mark", (count, last_mac)))
        except (ValueError, KeyError, TypeError):
            return [f"{self.mark_path} is unreadable"], False
        if not valid:
            return [f"{self.mark_path} was altered"], False
        if count > len(entries):
            behind = (
                f"the ledger holds {len(entries)} entries but had reached {count} "
                "(an older copy restored, or entries deleted)"
            )
            return [behind], True
        # The database may be ahead of the mark (a crash, or a failed write, after a commit).
        if count and not _same(entries[count - 1].mac, last_mac):
            return [f"entry {count} is not the one the ledger last recorded"], False
        return [], False

    def _check(
        self,
        key: bytes,
        connection: sqlite3.Connection,
        marks: tuple[str | None, str | None],
    ) -> tuple[list[str], list[Entry], str | None]:
        """Chain, head and mark problems in the caller's transaction, and the staged mark to
        put in place if it is the one that fits.

        `marks` are the mark and a reseal's staged mark, read before the transaction. A
        reseal stages its mark before its commit and puts it in place after: if it was cut
        short in between, the old mark no longer fits the re-signed chain but the staged one
        does (it is signed with the key and names an entry of this chain), and is accepted —
        never when the old mark shows the database behind it (that is a rollback to report).
        """
        problems, entries = self._problems(key, connection)
        mark, staged = marks
        found, behind = self._mark_state(key, entries, mark)
        if found and not behind and self._staged_mark_fits(key, entries, staged):
            return problems, entries, staged
        return problems + found, entries, None

    def _staged_mark_fits(self, key: bytes, entries: list[Entry], staged: str | None) -> bool:
        """A staged mark passes as the mark would, and names an entry: a creation's (count 0)
        would fit any chain."""
        if not staged or self._mark_state(key, entries, staged)[0]:
            return False
        return int(json.loads(staged)["count"]) >= 1

    def _creation_pending(self) -> list[tuple[Path, Path]]:
        """The staged (file, final name) pairs of a `create` cut short after its database
        appeared — only while that database is still empty (a ledger with entries is no
        creation, and a key planted beside it must not be adopted)."""
        pending = [
            (staged, final)
            for staged, final in (
                (self._staged_mark, self.mark_path),
                (self._staged_key, self.key_path),
            )
            if staged.is_file() and not final.exists()
        ]
        if not pending or not self.exists() or not self._empty():
            return []
        return pending

    def _recover_creation(self) -> None:
        """Finish a `create` cut short after its database appeared (`_creation_pending`)."""
        for staged, final in self._creation_pending():
            os.replace(staged, final)

    def _empty(self) -> bool:
        try:
            with self._connect() as connection:
                head = connection.execute("SELECT count FROM head WHERE id = 1").fetchone()
                rows = connection.execute("SELECT count(*) FROM entries").fetchone()
            return head is not None and head[0] == 0 and rows[0] == 0
        except LedgerError:
            return False

    @contextmanager
    def _connect(self, path: Path | None = None) -> Iterator[sqlite3.Connection]:
        """A connection to the database (or to `path`, a staged copy). SQLite's errors are
        sorted by their result code (`_cause`): damaged or foreign content is LedgerTampered,
        anything else a LedgerError naming the cause."""
        path = path or self.path
        uri = path.resolve().as_uri() + "?mode=rw"
        try:
            connection = sqlite3.connect(uri, uri=True, timeout=30.0)
        except sqlite3.Error as error:
            raise self._sqlite_error(error, path) from error
        connection.isolation_level = None  # explicit transactions below
        try:
            # EXTRA also syncs the directory after the journal is deleted: a power loss right
            # after a commit cannot undo it (and leave the mark ahead of the database).
            connection.execute("PRAGMA synchronous = EXTRA")
            yield connection
        except sqlite3.Error as error:
            raise self._sqlite_error(error, path) from error
        finally:
            connection.close()

    def _sqlite_error(self, error: sqlite3.Error, path: Path) -> LedgerError:
        cause = _cause(error)
        if cause is None:
            problem = f"not a readable ledger database: {_describe(error)}"
            return LedgerTampered(self.root / LEDGER, [problem])
        return LedgerError(f"{path}: cannot use the ledger now: {cause}: {_describe(error)}")

    def _absence(self) -> list[str] | None:
        """None if the database is here; else the problems its absence makes: none when the
        folder never had a ledger, one when its key or mark remain (a ledger deleted, or an
        import cut short)."""
        if self.exists():
            return None
        left = [path.name for path in (self.key_path, self.mark_path) if path.exists()]
        if not left:
            return []
        problem = f"{self.path} is missing but its {' and '.join(left)} exist"
        if self.import_cut_short():
            problem += " (an import cut short: run the same `join --ledger-from` again)"
        return [problem]

    def open(self) -> Ledger:
        """Create the ledger if this directory never had one; refuse if it had one that is
        gone (its key or mark is still here), or while an import into it is unfinished."""
        self._recover_creation()
        absence = self._absence()
        if absence:
            raise LedgerTampered(self.root / LEDGER, absence)
        if absence is not None:
            if self.import_cut_short():
                raise LedgerError(
                    f"{self.root}: an import of another ledger into this folder was cut short "
                    f"(its copy {self._staged_import.name} is here): run the same "
                    "`confide-client join --ledger-from` again"
                )
            self.create()
        return self

    # -- reading and verifying -----------------------------------------------------------
    @staticmethod
    def _entries(connection: sqlite3.Connection) -> list[Entry]:
        columns = ", ".join((*_FIELDS, "mac"))
        rows = connection.execute(f"SELECT {columns} FROM entries ORDER BY seq").fetchall()
        return [Entry.from_row(row) for row in rows]

    @staticmethod
    def _problems(key: bytes, connection: sqlite3.Connection) -> tuple[list[str], list[Entry]]:
        """Chain and head problems; the caller holds a transaction, so head and entries are
        one snapshot."""
        head = connection.execute(
            "SELECT ledger_id, created_at, count, last_mac, mac FROM head WHERE id = 1"
        ).fetchone()
        entries = Ledger._entries(connection)
        if head is None:
            return ["the ledger's head record is missing"], entries
        ledger_id, created_at, count, last_mac, head_mac = head
        problems = []
        if not _same(head_mac, _head_mac(key, ledger_id, created_at, count, last_mac)):
            problems.append("the head record was altered (or the key replaced)")
        previous = _genesis(key, ledger_id)
        for position, entry in enumerate(entries, start=1):
            if entry.seq != position:
                problems.append(
                    f"entry {position} is missing or out of order (found seq {entry.seq})"
                )
            values = tuple(getattr(entry, name) for name in _FIELDS)
            if not _same(entry.mac, _mac(key, previous, values)):
                problems.append(f"entry {entry.seq} was altered, moved or follows a deleted one")
            previous = entry.mac if isinstance(entry.mac, str) else ""
        if count != len(entries) or not _same(last_mac, previous):
            problems.append(
                f"the head records {count} entries and {len(entries)} are present "
                "(entries deleted, or an older copy restored)"
                if count != len(entries)
                else "the newest entry does not match the head"
            )
        return problems, entries

    def _snapshot(self, key: bytes, *, read_only: bool = False) -> tuple[list[str], list[Entry]]:
        """Every problem and every entry: the marks first, then one read transaction. A
        reseal's staged mark that fits (`_check`) is put in place unless `read_only`."""
        marks = (self._read_mark(), self._read_mark(self._staged_mark))
        with self._connect() as connection:
            connection.execute("BEGIN")
            problems, entries, staged = self._check(key, connection, marks)
            connection.execute("COMMIT")
        if staged is not None and not read_only:
            self._adopt_staged_mark(staged)
        return problems, entries

    def _adopt_staged_mark(self, text: str) -> None:
        """Put a fitting staged mark in place; best effort: it is accepted where it is."""
        with suppress(OSError):
            write_atomic(self.mark_path, text, mode=0o600)
            self._staged_mark.unlink()

    def verify(self, *, read_only: bool = False) -> list[str]:
        """Every integrity problem found (empty: the ledger is intact).

        `read_only` changes no file: a creation cut short is not finished (its empty ledger
        verifies) and a reseal's staged mark is not put in place. `join` reads other folders'
        ledgers this way: checking them must not change them.
        """
        if not read_only:
            self._recover_creation()
        absence = self._absence()
        if absence is not None:
            return absence
        if read_only and self._creation_pending():
            return []
        try:
            return self._snapshot(self._key(), read_only=read_only)[0]
        except LedgerTampered as error:
            return error.problems

    def entries(self, *, read_only: bool = False) -> list[Entry]:
        """Every entry, after verifying the whole chain (LedgerTampered if it fails). A folder
        without a ledger gets an empty one (`open`), or, with `read_only`, has no entries and
        is left as it is."""
        if not read_only:
            self.open()
        elif (absence := self._absence()) is not None or self._creation_pending():
            if absence:
                raise LedgerTampered(self.root / LEDGER, absence)
            return []
        problems, entries = self._snapshot(self._key(), read_only=read_only)
        if problems:
            raise LedgerTampered(self.root / LEDGER, problems)
        return entries

    def moved_to(self) -> str | None:
        """The folder this ledger was moved to (a 'moved' entry, see `record`); None if it was
        not. Reads only."""
        return moved_to(self.entries(read_only=True))

    def history(self, dataset: str, run: str | None = None) -> list[HistoryEntry]:
        """(sigma, q, steps) of every spend on `dataset` (only run `run`'s, if given)."""
        return [
            entry.history_entry
            for entry in self.entries()
            if entry.kind == "spend" and entry.dataset == dataset and run in (None, entry.run)
        ]

    def spent(self, delta: float, accountant: str = "rdp") -> list[DatasetSpend]:
        """Cumulative spend of every dataset in the ledger at `delta`: every spend entry's
        (sigma, q, steps) composed with `accountant` ("rdp", the default, "prv" or "pld"; see
        `confide.privacy.accounting`), whatever accountant each job reported with."""
        by_dataset: dict[str, list[Entry]] = {}
        for entry in self.entries():
            if entry.kind == "spend":
                by_dataset.setdefault(entry.dataset, []).append(entry)
        return [
            DatasetSpend(
                dataset=name,
                epsilon=epsilon([e.history_entry for e in rows], delta, accountant),
                delta=delta,
                rounds=len(rows),
                jobs=len({e.run for e in rows}),
                fingerprints=tuple(dict.fromkeys(e.fingerprint for e in rows)),
                accountant=accountant,
            )
            for name, rows in sorted(by_dataset.items())
        ]

    # -- writing -------------------------------------------------------------------------
    def _append(
        self,
        connection: sqlite3.Connection,
        key: bytes,
        kind: str,
        values: dict[str, object],
        recorded_at: str | None = None,
    ) -> Entry:
        """Append one entry and move the head, inside the caller's transaction."""
        ledger_id, created_at, count, last_mac = connection.execute(
            "SELECT ledger_id, created_at, count, last_mac FROM head WHERE id = 1"
        ).fetchone()
        fields = {"seq": count + 1, "recorded_at": recorded_at or _now(), "kind": kind} | values
        # As SQLite will store them (an int in a REAL column comes back a float): the MAC
        # must cover what verification will read.
        ordered = tuple(_COLUMN_TYPES[name](fields[name]) for name in _FIELDS)
        mac = _mac(key, last_mac, ordered)
        placeholders = ", ".join("?" * (len(_FIELDS) + 1))
        connection.execute(f"INSERT INTO entries VALUES ({placeholders})", (*ordered, mac))
        connection.execute(
            "UPDATE head SET count = ?, last_mac = ?, mac = ? WHERE id = 1",
            (count + 1, mac, _head_mac(key, ledger_id, created_at, count + 1, mac)),
        )
        return Entry.from_row((*ordered, mac))

    @contextmanager
    def _writing(self, connection: sqlite3.Connection, what: str) -> Iterator[None]:
        """One write transaction (one writer; readers see the ledger before or after it).

        On a full disk or a failed write SQLite rolls the transaction back by itself, so it is
        rolled back here only while still open (a ROLLBACK with none open fails, and that
        failure used to be reported as tampering). A write the environment stops (`_cause`:
        a full or read-only disk, another process) or a file staged beside the ledger that
        cannot be written is a LedgerError saying so and that the ledger is unchanged.
        """
        try:
            connection.execute("BEGIN IMMEDIATE")
            yield
            connection.execute("COMMIT")
        except (sqlite3.Error, OSError) as error:
            self._roll_back(connection)
            if isinstance(error, sqlite3.Error):
                cause, detail = _cause(error), _describe(error)
                if cause is None:
                    raise
            else:
                cause, detail = "a file beside the ledger could not be written", str(error)
            raise LedgerError(
                f"{self.path}: {cause} ({detail}); {what} was not recorded and the ledger is "
                "unchanged. Fix that (free space on this disk, make the ledger writable for "
                "this user, or stop the other process using it), then try again."
            ) from error
        except BaseException:
            self._roll_back(connection)
            raise

    @staticmethod
    def _roll_back(connection: sqlite3.Connection) -> None:
        if connection.in_transaction:
            with suppress(sqlite3.Error):  # closing the connection discards it anyway
                connection.execute("ROLLBACK")

    def _append_verified(
        self, kind: str, values: dict[str, object], what: str, *, spending: bool = False
    ) -> Entry:
        """Append one entry atomically after verifying the chain it extends (a spend only
        while the ledger was not moved elsewhere), then the mark."""
        self.open()
        key = self._key()
        marks = (self._read_mark(), self._read_mark(self._staged_mark))
        with self._connect() as connection, self._writing(connection, what):
            problems, entries, _ = self._check(key, connection, marks)
            if problems:
                raise LedgerTampered(self.root / LEDGER, problems)
            if spending and (moved := moved_to(entries)) is not None:
                raise LedgerError(
                    f"{self.root}: this ledger was moved to {moved}; train from there "
                    f"(confide-client start --dir {moved}). {what.capitalize()} was not recorded."
                )
            entry = self._append(connection, key, kind, values)
        self._mark_after_commit(key, entry, what)
        return entry

    def _mark_after_commit(self, key: bytes, entry: Entry, what: str) -> None:
        """Write the mark of a committed entry. A failure leaves the entry recorded and the
        database ahead of its mark, which verification accepts; the next entry's mark catches
        up once the cause is fixed."""
        try:
            self._write_mark(key, entry.seq, entry.mac)
        except OSError as error:
            raise LedgerError(
                f"{self.path}: {what} was recorded (it stands and counts towards the budget: "
                f"do not record it again), but the mark {self.mark_path} could not be updated "
                f"({error}). The ledger stays valid: its database is ahead of its mark, which "
                "verification accepts, and the next entry recorded updates the mark once this "
                "is fixed (free space on this disk, or make the file writable)."
            ) from error
        with suppress(OSError):  # a reseal's staged mark is behind the mark just written
            self._staged_mark.unlink(missing_ok=True)

    def record(self, spend: Spend) -> Entry:
        """Append `spend` atomically, after verifying the chain it extends. Refused
        (LedgerError) once the ledger was moved ('moved' entry): its spend continues in
        another folder's ledger, which this one would no longer reach.

        Writes nothing outside this folder: whether the folder goes into the host's ledger
        index is its caller's decision (`confide.client.continuity`)."""
        values = asdict(spend) | {"note": ""}
        return self._append_verified("spend", values, "this round", spending=True)

    def note(self, kind: str, note: str) -> Entry:
        """Record an operator's action of `kind` ('import', 'moved' or 'new-budget'; see
        `OPERATOR_KINDS`) with `note`, through the same chain as every spend."""
        if kind not in OPERATOR_KINDS or kind == "reseal":
            raise ValueError(f"not an entry an operator notes: {kind!r}")
        return self._append_verified(kind, _EMPTY | {"note": note}, f"the {kind} entry")

    def record_refusal(self, *, run: str, fab_hash: str, reason: str) -> Entry:
        """Record that this institution refused to run the app of `run` (FAB `fab_hash`) and
        why: a 'refused-app' entry, no spend, through the same chain as every spend. Its own
        method, not `note`: it is the institution's decision, never an operator's action."""
        note = json.dumps({"run": run, "fab-hash": fab_hash, "reason": reason})
        values = _EMPTY | {"run": run, "note": note}
        return self._append_verified(REFUSED_APP, values, "the app refusal")

    # -- importing -----------------------------------------------------------------------
    def import_cut_short(self) -> bool:
        """An import stopped before its database was put in place: its staged copy is here,
        the ledger is not (`import_from` run again clears it and imports afresh)."""
        return not self.exists() and self._staged_import.is_file()

    def import_from(self, source: Path) -> Entry:
        """Make this folder's (new) ledger a copy of the verified ledger in `source`, with an
        'import' entry appended: the copy keeps the HMAC key and the chain, so it verifies and
        spends exactly what `source` spent. Nothing in `source` changes.

        Staged, database last: the copy is made and its import entry appended in a staging
        file, then the key and the new mark are put in place, then the database — its rename
        is the one step that makes the ledger appear, entry included. A crash before it leaves
        a folder that refuses to train (a key and mark without a ledger), never an empty
        ledger; running the import again clears what it left and starts afresh.
        """
        origin = Ledger(source)
        self._clear_import_cut_short(origin)
        if self.exists() or self.key_path.exists() or self.mark_path.exists():
            raise LedgerError(f"{self.root}: a ledger (or its key or mark) already exists")
        if not origin.exists():
            raise LedgerError(f"{origin.root}: no ledger there to import")
        problems = origin.verify(read_only=True)
        if problems:
            raise LedgerTampered(origin.root / LEDGER, problems)
        # The marks before the database: the copy may be ahead of them, not behind.
        key = origin._key()
        marks = (origin._read_mark(), origin._read_mark(origin._staged_mark))
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            origin._copy_database(self._staged_import)
            entry = self._append_import(key, marks, origin)
            write_atomic(self.key_path, key, mode=0o600)
            write_atomic(self.mark_path, _mark_text(key, entry.seq, entry.mac), mode=0o600)
            os.replace(self._staged_import, self.path)
        except BaseException:  # a failure, not a crash: leave nothing half made behind
            with suppress(OSError, LedgerError):
                self._clear_import_cut_short(origin)
            raise
        return entry

    def _append_import(
        self, key: bytes, marks: tuple[str | None, str | None], origin: Ledger
    ) -> Entry:
        """Verify the staged copy against `origin`'s marks and append the import entry."""
        staged = self._staged_import
        with self._connect(staged) as connection, self._writing(connection, "the import"):
            problems, entries, _ = origin._check(key, connection, marks)
            if problems:
                raise LedgerTampered(origin.root / LEDGER, problems)
            note = json.dumps({"from": str(origin.root.resolve()), "entries": len(entries)})
            entry = self._append(connection, key, "import", _EMPTY | {"note": note})
        return entry

    def _clear_import_cut_short(self, origin: Ledger) -> None:
        """Remove what an import cut short left here — its staged copy and the key and mark
        it put in place — but only if that key is `origin`'s (the same import run again):
        another ledger's key is never removed."""
        if not self.import_cut_short():
            return
        if self.key_path.exists() and (
            not origin.key_path.is_file()
            or self.key_path.read_bytes() != origin.key_path.read_bytes()
        ):
            raise LedgerError(
                f"{self.root}: an import of another ledger than {origin.root} was cut short "
                f"here: run join again with the --ledger-from it named, or move {KEY}, {MARK} "
                f"and {self._staged_import.name} out of this folder"
            )
        for path in (self.mark_path, self.key_path, self._staged_import):  # the copy last
            path.unlink(missing_ok=True)

    def _copy_database(self, target: Path) -> None:
        """A consistent copy of the database (SQLite's backup API), mode 0600 from the start."""
        target.unlink(missing_ok=True)
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
        copy = sqlite3.connect(target)
        try:
            with self._connect() as connection:
                connection.backup(copy)
        finally:
            copy.close()

    # -- resealing -----------------------------------------------------------------------
    def reseal(self, reason: str) -> list[str]:
        """An operator accepts the ledger as it now stands and returns it to service.

        Every entry is kept as stored (an altered value stays altered: the spend reported
        afterwards is what the rows say; restoring a backup is the other way out), re-signed
        in sequence order, and a 'reseal' entry records `reason` and the problems found.
        Returns those problems.

        Its mark (and a new key, when the old one is missing or damaged) is staged before the
        commit and put in place after it, the key first: a reseal cut short after its commit
        still verifies (the staged mark fits, `_check`), except before a new key was in place
        — the ledger then reports its key missing until the reseal is run again, since a key
        beside a ledger with entries is never adopted by itself.
        """
        if not reason.strip():
            raise LedgerError("a reseal needs a reason (it is recorded in the ledger)")
        problems = self.verify()
        if not self.exists():  # deleted: start again, saying so in the first entry
            self.key_path.unlink(missing_ok=True)
            self.mark_path.unlink(missing_ok=True)
            self.create()
        if not self._readable():
            raise LedgerError(
                f"{self.path} is not a readable SQLite database: restore it from a backup, or "
                f"move it and {self.key_path} away to start a new, empty ledger"
            )
        key, new_key = self._reseal_key()
        with self._connect() as connection, self._writing(connection, "the reseal"):
            last = self._resign(
                connection, key, json.dumps({"reason": reason, "problems": problems})
            )
            write_atomic(self._staged_mark, _mark_text(key, last.seq, last.mac), mode=0o600)
        self._finish_reseal(new_key)
        return problems

    def _reseal_key(self) -> tuple[bytes, bool]:
        """The key to re-sign with: the ledger's, else (missing or damaged) a new one, staged
        beside it (True)."""
        try:
            return self._key(), False
        except LedgerTampered:
            key = secrets.token_bytes(32)
            try:
                write_atomic(self._staged_key, key, mode=0o600)
            except OSError as error:
                raise LedgerError(
                    f"{self._staged_key}: cannot write a new key ({error}); the reseal was not "
                    "recorded and the ledger is unchanged"
                ) from error
            return key, True

    def _resign(self, connection: sqlite3.Connection, key: bytes, note: str) -> Entry:
        """In the reseal's transaction: every entry re-signed in order under a new ledger id,
        then the 'reseal' entry with `note`."""
        entries = self._entries(connection)
        ledger_id, created_at = secrets.token_hex(16), _now()
        genesis = _genesis(key, ledger_id)
        connection.execute("DELETE FROM entries")
        connection.execute("DELETE FROM head")
        connection.execute(
            "INSERT INTO head VALUES (1, ?, ?, 0, ?, ?)",
            (ledger_id, created_at, genesis, _head_mac(key, ledger_id, created_at, 0, genesis)),
        )
        for entry in entries:
            values = {name: getattr(entry, name) for name in _FIELDS[3:]}
            self._append(connection, key, entry.kind, values, entry.recorded_at)
        return self._append(connection, key, "reseal", _EMPTY | {"note": note})

    def _finish_reseal(self, new_key: bool) -> None:
        """After the reseal's commit: a new key, then the staged mark, put in place."""
        if new_key:
            self._put_in_place(
                self._staged_key,
                self.key_path,
                "Until it is in place, the ledger fails verification (its key is missing or "
                "damaged): fix the cause, then run the reseal again.",
            )
        self._put_in_place(
            self._staged_mark,
            self.mark_path,
            "Its key is in place and the ledger verifies (the staged mark fits it and is "
            "accepted); the next use puts the mark in place once the cause is fixed.",
        )

    def _put_in_place(self, staged: Path, final: Path, state: str) -> None:
        """One rename after a reseal's commit; a failure says what state the ledger is in."""
        try:
            os.replace(staged, final)
        except OSError as error:
            raise LedgerError(
                f"{self.path}: the reseal was recorded, but {staged.name} could not replace "
                f"{final} ({error}). {state}"
            ) from error

    def _readable(self) -> bool:
        """The database reads as a ledger (an environment that stops it is a LedgerError)."""
        try:
            with self._connect() as connection:
                self._entries(connection)
                return connection.execute("SELECT count(*) FROM head").fetchone() is not None
        except LedgerTampered:
            return False
