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
reason in the note), so that the refusal stays on record beside the spend; a 'refused-round'
entry a round the institution's limits refused (deployed: the runner records it, with the run
and round). Only 'spend' entries count towards epsilon.

Errors: LedgerTampered when the content fails verification (or is no ledger database at
all); LedgerError, naming the cause, when the environment stops its use (a read-only or full
disk, another process holding it): those are fixed without an operator's reseal.

Code: this module is the public face (`Ledger`, the row types, `moved_to`, fingerprints).
Each part of the work is a private module beside it, readable on its own: the format on disk
and its MACs (`_ledger_format`), the folder's files and key (`_ledger_files`), the SQLite
store and its error translation (`_ledger_store`), the head mark (`_ledger_mark`), creation
and its recovery (`_ledger_create`), verification (`_ledger_verify`), import
(`_ledger_import`) and reseal (`_ledger_reseal`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from confide.common.errors import LedgerError
from confide.common.errors import LedgerTampered as LedgerTampered  # callers import it here
from confide.privacy._ledger_create import LedgerCreation
from confide.privacy._ledger_files import LedgerFiles
from confide.privacy._ledger_format import EMPTY, KEY, LEDGER, MARK, Entry, Spend
from confide.privacy._ledger_import import LedgerImport
from confide.privacy._ledger_mark import HeadMark
from confide.privacy._ledger_reseal import LedgerReseal
from confide.privacy._ledger_store import LedgerStore, append
from confide.privacy._ledger_verify import LedgerCheck
from confide.privacy.accounting import HistoryEntry, epsilon

# The row types are defined with the format they are stored in, and are this module's: their
# name stays `confide.privacy.ledger.Entry`, where their annotations are resolved too.
Spend.__module__ = Entry.__module__ = __name__

# The name spend is recorded under unless an institution names its data otherwise.
DEFAULT_DATASET = "default"
# Kinds of the entries an operator's action writes (no spend; see the module's docstring).
OPERATOR_KINDS = ("reseal", "import", "moved", "new-budget")
# Kinds the institution records by itself that change nothing about the data's ledger (no
# spend, no operator's decision): an app it refused to run (`record_refusal`), a round its
# limits refused (`record_round_refusal`).
REFUSED_APP = "refused-app"
REFUSED_ROUND = "refused-round"
EVENT_KINDS = (REFUSED_APP, REFUSED_ROUND)


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


def spent_of(entries: list[Entry], delta: float, accountant: str = "rdp") -> list[DatasetSpend]:
    """`Ledger.spent` of `entries` already read and verified (a reader that must not write,
    such as /metrics, reads them with `entries(read_only=True)`)."""
    by_dataset: dict[str, list[Entry]] = {}
    for entry in entries:
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


def fingerprint_bytes(*parts: bytes) -> str:
    """Content hash of a dataset: SHA-256 over its bytes (for arrays, their raw buffers)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return "sha256:" + digest.hexdigest()


def fingerprint_file(path: Path) -> str:
    """Content hash of a data file (read in 1 MiB blocks), or of a folder of data files (an
    image folder): every file's relative name, size and bytes in name order, hidden entries
    (names starting with ".", which the loaders skip) left out."""
    digest = hashlib.sha256()
    path = Path(path)
    if not path.is_dir():
        for block in _blocks(path):
            digest.update(block)
        return "sha256:" + digest.hexdigest()
    files = sorted(
        file.relative_to(path).as_posix()
        for file in path.rglob("*")
        if file.is_file() and not any(p.startswith(".") for p in file.relative_to(path).parts)
    )
    for name in files:
        digest.update(name.encode() + b"\0")
        digest.update((path / name).stat().st_size.to_bytes(8, "big"))
        for block in _blocks(path / name):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _blocks(file: Path) -> Iterator[bytes]:
    with open(file, "rb") as stream:
        while block := stream.read(1 << 20):
            yield block


class Ledger:
    """The ledger in `root` (an institution's state directory); created on first use.

    A facade: each operation is done by the collaborator for it (see the module's
    docstring), built from `root` on each use, so that they always name this folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    path = property(lambda self: self.root / LEDGER)
    key_path = property(lambda self: self.root / KEY)
    mark_path = property(lambda self: self.root / MARK)

    @property
    def _files(self) -> LedgerFiles:
        return LedgerFiles(self.root)

    # -- files ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.path.is_file()

    def commitment(self, fingerprint: str) -> str:
        """HMAC-SHA256 of a dataset's fingerprint under this ledger's key: what the institution
        publishes about the data behind a model (its card, confide.server.model_file).

        A fingerprint itself (a hash of the whole dataset) is not published: anyone holding
        all but one record could test candidates for the last one against it. Without the key
        the commitment is indistinguishable from random; with it, the institution matches a
        model's card to the dataset its ledger records. The key is one derived from the
        ledger's (HMAC of a fixed label), never the ledger's own, which must stay the only
        key that can extend its chain. A reseal or an import (a new ledger key) changes the
        commitments from then on.
        """
        ledger_key = self._files.read_key()
        key = hmac.new(ledger_key, b"confide.data-commitment-key", hashlib.sha256).digest()
        message = b"confide.data-commitment\0" + fingerprint.encode()
        return "hmac-sha256:" + hmac.new(key, message, hashlib.sha256).hexdigest()

    def create(self) -> None:
        """Make a new, empty ledger, its mark and its key. All three are staged first, then
        put in place database first: a crash leaves no ledger (it is created again) or an
        empty one whose staged files are put in place on its next use."""
        LedgerCreation(self._files).create()

    def open(self) -> Ledger:
        """Create the ledger if this directory never had one; refuse if it had one that is
        gone (its key or mark is still here), or while an import into it is unfinished."""
        LedgerCreation(self._files).open()
        return self

    # -- reading and verifying -----------------------------------------------------------
    def verify(self, *, read_only: bool = False) -> list[str]:
        """Every integrity problem found (empty: the ledger is intact).

        `read_only` changes no file: a creation cut short is not finished (its empty ledger
        verifies) and a reseal's staged mark is not put in place. `join` reads other folders'
        ledgers this way: checking them must not change them.
        """
        return LedgerCheck(self._files).verify(read_only=read_only)

    def entries(self, *, read_only: bool = False) -> list[Entry]:
        """Every entry, after verifying the whole chain (LedgerTampered if it fails). A folder
        without a ledger gets an empty one (`open`), or, with `read_only`, has no entries and
        is left as it is."""
        return LedgerCheck(self._files).entries(read_only=read_only)

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
        return spent_of(self.entries(), delta, accountant)

    # -- writing -------------------------------------------------------------------------
    def _append_verified(
        self, kind: str, values: dict[str, object], what: str, *, spending: bool = False
    ) -> Entry:
        """Append one entry atomically after verifying the chain it extends (a spend only
        while the ledger was not moved elsewhere), then the mark."""
        self.open()
        files = self._files
        key = files.read_key()
        mark, store = HeadMark(files), LedgerStore(files)
        marks = mark.read_both()
        with store.connect() as connection, store.writing(connection, what):
            problems, entries, _ = LedgerCheck(files).check(key, connection, marks)
            if problems:
                raise files.tampered(problems)
            if spending and (moved := moved_to(entries)) is not None:
                raise LedgerError(
                    f"{self.root}: this ledger was moved to {moved}; train from there "
                    f"(confide-client start --dir {moved}). {what.capitalize()} was not recorded."
                )
            entry = append(connection, key, kind=kind, values=values)
        mark.advance(key, entry, what)
        return entry

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
        return self._append_verified(kind, EMPTY | {"note": note}, f"the {kind} entry")

    def record_refusal(self, *, run: str, fab_hash: str, reason: str) -> Entry:
        """Record that this institution refused to run the app of `run` (FAB `fab_hash`) and
        why: a 'refused-app' entry, no spend, through the same chain as every spend. Its own
        method, not `note`: it is the institution's decision, never an operator's action."""
        note = json.dumps({"run": run, "fab-hash": fab_hash, "reason": reason})
        values = EMPTY | {"run": run, "note": note}
        return self._append_verified(REFUSED_APP, values, "the app refusal")

    def record_round_refusal(self, *, run: str, server_round: int, reason: str) -> Entry:
        """Record that this institution's limits refused round `server_round` of `run`, and
        why: a 'refused-round' entry, no spend (nothing was trained), through the same chain
        as every spend; what `confide-client start`'s /metrics counts."""
        note = json.dumps({"run": run, "round": server_round, "reason": reason})
        values = EMPTY | {"run": run, "round": server_round, "note": note}
        return self._append_verified(REFUSED_ROUND, values, "the round refusal")

    # -- importing and resealing ---------------------------------------------------------
    def import_cut_short(self) -> bool:
        """An import stopped before its database was put in place: its staged copy is here,
        the ledger is not (`import_from` run again clears it and imports afresh)."""
        return self._files.import_cut_short()

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
        return LedgerImport(self._files, LedgerFiles(Path(source))).run()

    def reseal(self, reason: str) -> list[str]:
        """An operator accepts the ledger as it now stands and returns it to service.

        Every entry is kept as stored (an altered value stays altered: the spend reported
        afterwards is what the rows say; restoring a backup is the other way out), re-signed
        in sequence order, and a 'reseal' entry records `reason` and the problems found.
        Returns those problems.

        Its mark (and a new key, when the old one is missing or damaged) is staged before the
        commit and put in place after it, the key first: a reseal cut short after its commit
        still verifies (the staged mark fits), except before a new key was in place — the
        ledger then reports its key missing until the reseal is run again, since a key
        beside a ledger with entries is never adopted by itself.
        """
        return LedgerReseal(self._files).run(reason)
