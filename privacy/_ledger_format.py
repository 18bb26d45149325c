"""The privacy ledger's format on disk: its file names, its SQLite schema, the rows it stores
and the HMACs that chain them (the design is in `confide.privacy.ledger`'s docstring).

Everything here decides what an existing ledger verifies as: a change to a column, its order
or the text a MAC covers makes every ledger already written fail verification.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from confide.privacy.accounting import HistoryEntry

LEDGER = "ledger.sqlite"
KEY = "ledger.key"
MARK = "ledger.head"
FORMAT = "confide-ledger-v1"
# Every column an entry's MAC covers, in MAC order.
FIELDS = (
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
SCHEMA = """
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
COLUMN_TYPES = {
    name: float if name in _REAL else int if name in _INTEGER else str for name in FIELDS
}
# The spend fields of the entries that record no spend (see the ledger's docstring).
EMPTY: dict[str, object] = {
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
        return cls(**dict(zip((*FIELDS, "mac"), row, strict=True)))  # type: ignore[arg-type]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def mac(key: bytes, previous: str, values: tuple[object, ...]) -> str:
    message = previous.encode() + json.dumps(values, separators=(",", ":")).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def genesis(key: bytes, ledger_id: str) -> str:
    return mac(key, "", (FORMAT, ledger_id))


def head_mac(key: bytes, *, ledger_id: str, created_at: str, count: int, last_mac: str) -> str:
    return mac(key, "head", (FORMAT, ledger_id, created_at, count, last_mac))


def same(stored: object, expected: str) -> bool:
    """A stored MAC equals the expected one (in constant time); a value that is no text at
    all (a BLOB or NULL written into the column) is simply not equal."""
    return isinstance(stored, str) and hmac.compare_digest(stored, expected)
