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
another folder's ledger) and 'new-budget' (a new budget on data another ledger had spent on,
with the reason). Only 'spend' entries count towards epsilon.
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

from confide.privacy.accounting import HistoryEntry, epsilon
from confide.privacy.ledger_index import index_institution_ledger
from confide.tasks.files import write_atomic

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
OPERATOR_KINDS = ("reseal", "import", "new-budget")
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


class LedgerError(RuntimeError):
    """The ledger cannot be used; the message says what and where."""


class LedgerTampered(LedgerError):
    """The ledger failed verification: training must wait for an operator."""

    def __init__(self, root: Path, problems: list[str]) -> None:
        self.problems = problems
        listed = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        super().__init__(
            f"{root / LEDGER} failed verification ({listed}). No training until an operator "
            f"checks it: `confide-client budget verify --dir {root}`"
        )


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
    """A ledger row as stored: a spend, or an operator's action (`OPERATOR_KINDS`, see `note`)."""

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


def _write_failed(error: sqlite3.OperationalError) -> bool:
    """SQLITE_FULL (no space left) or SQLITE_IOERR (a write the system refused)."""
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)


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

    # -- files ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.path.is_file()

    def _key(self) -> bytes:
        try:
            key = self.key_path.read_bytes()
        except FileNotFoundError:
            raise LedgerTampered(
                self.root, [f"the ledger's key {self.key_path} is missing"]
            ) from None
        except OSError as error:
            raise LedgerError(f"{self.key_path}: cannot read the ledger key: {error}") from None
        if len(key) != 32:
            raise LedgerTampered(self.root, [f"{self.key_path} is not a 32-byte key"])
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

    _staged_key = property(lambda self: self.root / f".{KEY}.new")
    _staged_mark = property(lambda self: self.root / f".{MARK}.new")

    def _write_mark(self, key: bytes, count: int, last_mac: str) -> None:
        """Record the newest (count, mac) outside the database, after each commit: a copy of
        the database alone restored from an older backup is then behind its mark."""
        write_atomic(self.mark_path, _mark_text(key, count, last_mac), mode=0o600)

    def _read_mark(self) -> str | None:
        """The mark's text (None if missing); read before the database, so that a commit
        in between leaves the database ahead of it, which verification accepts."""
        try:
            return self.mark_path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return ""

    def _mark_problems(self, key: bytes, entries: list[Entry], text: str | None) -> list[str]:
        if text is None:
            return [f"{self.mark_path} (the record of the newest entry) is missing"]
        try:
            mark = json.loads(text)
            count, last_mac = int(mark["count"]), str(mark["last_mac"])
            valid = hmac.compare_digest(str(mark["mac"]), _mac(key, "mark", (count, last_mac)))
        except (ValueError, KeyError, TypeError):
            return [f"{self.mark_path} is unreadable"]
        if not valid:
            return [f"{self.mark_path} was altered"]
        if count > len(entries):
            return [
                f"the ledger holds {len(entries)} entries but had reached {count} "
                "(an older copy restored, or entries deleted)"
            ]
        # The database may be one commit ahead of the mark (a crash between the two writes).
        if count and not hmac.compare_digest(entries[count - 1].mac, last_mac):
            return [f"entry {count} is not the one the ledger last recorded"]
        return []

    def _recover_creation(self) -> None:
        """Finish a `create` cut short after its database appeared: put the staged mark and
        key in place — only while the ledger is still empty (a ledger with entries is no
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
            return
        for staged, final in pending:
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
    def _connect(self) -> Iterator[sqlite3.Connection]:
        uri = self.path.resolve().as_uri() + "?mode=rw"
        try:
            connection = sqlite3.connect(uri, uri=True, timeout=30.0)
        except sqlite3.Error as error:
            raise LedgerError(f"{self.path}: cannot open the ledger: {error}") from None
        connection.isolation_level = None  # explicit transactions below
        try:
            # EXTRA also syncs the directory after the journal is deleted: a power loss right
            # after a commit cannot undo it (and leave the mark ahead of the database).
            connection.execute("PRAGMA synchronous = EXTRA")
            yield connection
        except sqlite3.OperationalError as error:
            message = str(error)
            if any(word in message for word in ("locked", "disk", "unable to open", "full")):
                raise LedgerError(f"{self.path}: cannot use the ledger now: {message}") from None
            raise LedgerTampered(self.root, [f"not a readable ledger database: {error}"]) from None
        except sqlite3.DatabaseError as error:
            raise LedgerTampered(self.root, [f"not a readable ledger database: {error}"]) from None
        finally:
            connection.close()

    def open(self) -> Ledger:
        """Create the ledger if this directory never had one; refuse if it had one that is
        gone (its key or mark is still here)."""
        self._recover_creation()
        if not self.exists():
            left = [path.name for path in (self.key_path, self.mark_path) if path.exists()]
            if left:
                raise LedgerTampered(
                    self.root, [f"{self.path} is missing but its {' and '.join(left)} exist"]
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
        if not hmac.compare_digest(
            head_mac, _head_mac(key, ledger_id, created_at, count, last_mac)
        ):
            problems.append("the head record was altered (or the key replaced)")
        previous = _genesis(key, ledger_id)
        for position, entry in enumerate(entries, start=1):
            if entry.seq != position:
                problems.append(
                    f"entry {position} is missing or out of order (found seq {entry.seq})"
                )
            values = tuple(getattr(entry, name) for name in _FIELDS)
            if not hmac.compare_digest(entry.mac, _mac(key, previous, values)):
                problems.append(f"entry {entry.seq} was altered, moved or follows a deleted one")
            previous = entry.mac
        if count != len(entries) or not hmac.compare_digest(last_mac, previous):
            problems.append(
                f"the head records {count} entries and {len(entries)} are present "
                "(entries deleted, or an older copy restored)"
                if count != len(entries)
                else "the newest entry does not match the head"
            )
        return problems, entries

    def _snapshot(self, key: bytes) -> tuple[list[str], list[Entry]]:
        """Every problem and every entry: the mark first, then one read transaction."""
        mark = self._read_mark()
        with self._connect() as connection:
            connection.execute("BEGIN")
            problems, entries = self._problems(key, connection)
            connection.execute("COMMIT")
        return problems + self._mark_problems(key, entries, mark), entries

    def verify(self) -> list[str]:
        """Every integrity problem found (empty: the ledger is intact)."""
        self._recover_creation()
        if not self.exists():
            left = [path.name for path in (self.key_path, self.mark_path) if path.exists()]
            if left:
                return [f"{self.path} is missing but its {' and '.join(left)} exist"]
            return []
        try:
            return self._snapshot(self._key())[0]
        except LedgerTampered as error:
            return error.problems

    def entries(self) -> list[Entry]:
        """Every entry, after verifying the whole chain (LedgerTampered if it fails)."""
        self.open()
        problems, entries = self._snapshot(self._key())
        if problems:
            raise LedgerTampered(self.root, problems)
        return entries

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
        failure used to be reported as tampering). Such a write is a LedgerError saying so.
        """
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield
            connection.execute("COMMIT")
        except BaseException as error:
            if connection.in_transaction:
                with suppress(sqlite3.Error):  # closing the connection discards it anyway
                    connection.execute("ROLLBACK")
            if isinstance(error, sqlite3.OperationalError) and _write_failed(error):
                raise LedgerError(
                    f"{self.path}: the disk is full or the write failed ({error}); {what} was "
                    "not recorded and the ledger is unchanged. Free space on this disk (or fix "
                    "it), then try again."
                ) from error
            raise

    def _append_verified(self, kind: str, values: dict[str, object], what: str) -> Entry:
        """Append one entry atomically after verifying the chain it extends, then the mark."""
        self.open()
        key = self._key()
        with self._connect() as connection:
            mark = self._read_mark()
            with self._writing(connection, what):
                problems, entries = self._problems(key, connection)
                problems += self._mark_problems(key, entries, mark)
                if problems:
                    raise LedgerTampered(self.root, problems)
                entry = self._append(connection, key, kind, values)
        try:
            self._write_mark(key, entry.seq, entry.mac)
        except OSError as error:  # the entry stands: the database may be ahead of its mark
            raise LedgerError(
                f"{self.path}: {what} was recorded, but {self.mark_path} could not be updated "
                f"({error}); the ledger stays valid. Free space on this disk, then try again."
            ) from error
        return entry

    def record(self, spend: Spend) -> Entry:
        """Append `spend` atomically, after verifying the chain it extends; index the folder
        under the spend's fingerprint if it is an institution's (`ledger_index`)."""
        entry = self._append_verified("spend", asdict(spend) | {"note": ""}, "this round")
        index_institution_ledger(self.root, [spend.fingerprint])
        return entry

    def note(self, kind: str, note: str) -> Entry:
        """Record an operator's action of `kind` ('import' or 'new-budget'; see
        `OPERATOR_KINDS`) with `note`, through the same chain as every spend."""
        if kind not in OPERATOR_KINDS or kind == "reseal":
            raise ValueError(f"not an entry an operator notes: {kind!r}")
        return self._append_verified(kind, _EMPTY | {"note": note}, f"the {kind} entry")

    def import_from(self, source: Path) -> Entry:
        """Make this folder's (new) ledger a copy of the verified ledger in `source`, then
        record the import: the copy keeps the HMAC key, the chain and the mark, so it verifies
        and spends exactly what `source` spent.

        The key and the mark are put in place before the database: a copy cut short leaves a
        folder that refuses to train (its key or mark without a ledger), never an empty ledger.
        """
        origin = Ledger(source)
        if self.exists() or self.key_path.exists() or self.mark_path.exists():
            raise LedgerError(f"{self.root}: a ledger (or its key or mark) already exists")
        if not origin.exists():
            raise LedgerError(f"{origin.root}: no ledger there to import")
        problems = origin.verify()
        if problems:
            raise LedgerTampered(origin.root, problems)
        mark = origin._read_mark()  # before the database: the copy may be ahead of it, not behind
        if not mark:
            raise LedgerTampered(origin.root, [f"{origin.mark_path} is missing or unreadable"])
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = self.root / f".{LEDGER}.import"
        origin._copy_database(staging)
        write_atomic(self.key_path, origin._key(), mode=0o600)
        write_atomic(self.mark_path, mark, mode=0o600)
        os.replace(staging, self.path)
        count = len(self.entries())
        note = json.dumps({"from": str(origin.root.resolve()), "entries": count})
        return self.note("import", note)

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

    def reseal(self, reason: str) -> list[str]:
        """An operator accepts the ledger as it now stands and returns it to service.

        Every entry is kept as stored (an altered value stays altered: the spend reported
        afterwards is what the rows say; restoring a backup is the other way out), re-signed
        in sequence order, and a 'reseal' entry records `reason` and the problems found.
        Returns those problems.
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
        staged_key = self._staged_key
        try:
            key = self._key()
        except LedgerTampered:  # missing or damaged key: a new one, put in place after commit
            key = secrets.token_bytes(32)
            write_atomic(staged_key, key, mode=0o600)
        with self._connect() as connection, self._writing(connection, "the reseal"):
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
            note = json.dumps({"reason": reason, "problems": problems})
            last = self._append(connection, key, "reseal", _EMPTY | {"note": note})
        self._write_mark(key, last.seq, last.mac)
        if staged_key.exists():
            os.replace(staged_key, self.key_path)
        return problems

    def _readable(self) -> bool:
        try:
            with self._connect() as connection:
                self._entries(connection)
                return connection.execute("SELECT count(*) FROM head").fetchone() is not None
        except LedgerError:
            return False
