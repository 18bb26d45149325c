"""One privacy budget per dataset, whatever folder or key an institution uses.

A ledger lives in the institution's folder, so joining again into a new folder would start
counting the same data's privacy spend from zero. `join` therefore decides, before it
contacts the coordinator, what the new folder's ledger continues:

- nothing: no other ledger on this host spent on this data (by its fingerprint, via the
  host's `LedgerIndex`), or the folder already holds the ledger that did;
- `--ledger-from DIR`: the folder's ledger becomes a copy of DIR's (an 'import' entry);
- `--new-budget --reason`: a new budget on purpose (a 'new-budget' entry with the reason).

Anything else is refused, naming the other ledgers, their spend and both ways out. A ledger
that fails verification refuses too: what it spent cannot be known. Other folders' ledgers are
only read (`Ledger.entries(read_only=True)`): checking them changes nothing there.

Once the coordinator accepted the join, a ledger continued with `--ledger-from` gets a 'moved'
entry naming the new folder: it records no spend any more (`mark_moved`).

The host's index is written from here, never by the ledger itself: at `join`, `rotate-key`,
`budget verify` and after each round a deployed institution records
(`index_institution_ledger`); simulated institutions' folders are never indexed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from confide.client.institution import InstitutionDir, InstitutionError
from confide.common.errors import ContinuityError
from confide.privacy.accounting import epsilon
from confide.privacy.ledger import (
    EVENT_KINDS,
    Entry,
    Ledger,
    LedgerError,
    LedgerTampered,
    moved_to,
)
from confide.privacy.ledger_index import LedgerIndex, LedgerIndexError

_log = logging.getLogger(__name__)
# How a refusal names the accountant a folder's spend is stated with.
_ACCOUNTANTS = {"rdp": "RDP", "pld": "PLD"}


@dataclass(frozen=True)
class LedgerPlan:
    """What `join` does with the new folder's ledger, decided before any network call."""

    fingerprint: str
    source: Path | None = None  # --ledger-from
    reason: str | None = None  # --new-budget --reason
    set_aside: tuple[Path, ...] = field(default=())  # ledgers a new budget does not continue


@dataclass(frozen=True)
class _Spends:
    """One ledger's spends on the data (as comparable rows), the folders it was imported
    from, and its problems if any."""

    folder: Path
    rows: frozenset[tuple[object, ...]]
    entries: tuple[Entry, ...] = ()
    imported_from: frozenset[Path] = frozenset()
    problems: tuple[str, ...] = ()
    moved: str | None = None  # where the ledger was moved to ('moved' entry), if it was

    def supersedes(self, other: _Spends) -> bool:
        """This ledger holds every spend of `other`, and more or by importing it."""
        return other.rows < self.rows or (
            other.rows == self.rows and other.folder in self.imported_from
        )


def _read(folder: Path, fingerprint: str) -> _Spends:
    """The verified spends of `folder`'s ledger on `fingerprint`, read without changing any
    file there (another folder's ledger is only checked)."""
    try:
        entries = Ledger(folder).entries(read_only=True)
    except LedgerTampered as error:
        return _Spends(folder, frozenset(), problems=tuple(error.problems))
    except LedgerError as error:
        return _Spends(folder, frozenset(), problems=(str(error),))
    mine = tuple(e for e in entries if e.kind == "spend" and e.fingerprint == fingerprint)
    # A spend is the same in a copy of the ledger: compare what was spent, not the MACs
    # (a resealed copy is re-signed).
    rows = frozenset((e.recorded_at, *e.history_entry, e.run, e.round, e.dataset) for e in mine)
    sources = frozenset(
        Path(json.loads(e.note)["from"]).resolve() for e in entries if e.kind == "import"
    )
    return _Spends(folder, rows, entries=mine, imported_from=sources, moved=moved_to(entries))


def _has_ledger(ledger: Ledger) -> bool:
    """Any of the ledger's files is there (a ledger deleted beside its key still counts: it
    fails verification)."""
    return any(path.exists() for path in (ledger.path, ledger.key_path, ledger.mark_path))


def _others(index: LedgerIndex, fingerprint: str, excluded: set[Path]) -> list[_Spends]:
    """Indexed ledger folders (still there, not `excluded`) that spent on the data or fail."""
    try:
        folders = index.folders(fingerprint)
    except LedgerIndexError as error:
        raise ContinuityError(f"{error}; cannot check this data's earlier spend") from None
    found = []
    for folder in dict.fromkeys(folder.resolve() for folder in folders):
        if folder in excluded or not _has_ledger(Ledger(folder)):
            continue
        spends = _read(folder, fingerprint)
        if spends.rows or spends.problems:
            found.append(spends)
    return found


def _accountant(folder: Path) -> tuple[str, str]:
    """The accountant `folder`'s institution states its budget with (`[privacy] accountant`
    in its institution.toml), else RDP; and where that choice came from."""
    try:
        chosen = InstitutionDir(folder).load().privacy.accountant
    except (InstitutionError, OSError):
        return "rdp", "the default: no readable institution.toml there"
    return chosen, "as its institution.toml sets"


def _describe(spends: _Spends, delta: float) -> str:
    """One line of a refusal: the folder's spend as its own institution states it."""
    if spends.problems:
        return f"  {spends.folder}: its ledger fails verification ({spends.problems[0]})"
    accountant, source = _accountant(spends.folder)
    spent = epsilon([e.history_entry for e in spends.entries], delta, accountant)
    datasets = ", ".join(sorted({e.dataset for e in spends.entries}))
    return (
        f"  {spends.folder}: epsilon {spent:.3f} spent at delta {delta:g} "
        f"({_ACCOUNTANTS.get(accountant, accountant)} accountant, {source}) over "
        f"{len(spends.entries)} rounds (dataset {datasets})"
    )


def _refusal(data: Path, fingerprint: str, others: list[_Spends], delta: float) -> str:
    listed = "\n".join(_describe(spends, delta) for spends in others)
    first = others[0].folder
    return (
        f"{data}: this data ({fingerprint[:23]}...) already spent privacy budget in another "
        f"ledger on this host, which a new folder would not count:\n{listed}\n"
        "Continue that budget in the new folder (its ledger is copied and the import recorded):\n"
        f"  confide-client join ... --ledger-from {first}\n"
        "or start a new budget on purpose, with the reason recorded in the new ledger:\n"
        '  confide-client join ... --new-budget --reason "..."\n'
        f"To change only the key, keep the folder instead: confide-client rotate-key --dir {first}"
    )


def _uncovered(others: list[_Spends], base: frozenset[tuple[object, ...]]) -> list[_Spends]:
    """Ledgers whose spend on the data `base` does not already hold, without those another
    of them supersedes (a ledger imported elsewhere later)."""
    left = [o for o in others if o.problems or not o.rows <= base]
    return [o for o in left if o.problems or not any(p.supersedes(o) for p in left)]


def _imported_last(own: Ledger, source: Path) -> bool:
    """`own` holds a finished import of `source` and nothing since: a join with
    `--ledger-from` cut short after the import and run again."""
    try:
        entries = [e for e in own.entries(read_only=True) if e.kind not in EVENT_KINDS]
    except LedgerError:
        return False
    if not entries or entries[-1].kind != "import":
        return False
    try:
        return Path(json.loads(entries[-1].note)["from"]) == source.resolve()
    except (ValueError, KeyError, TypeError):
        return False


def _check_flags(ledger_from: Path | None, new_budget: bool, reason: str, own: Ledger) -> None:
    if ledger_from is not None and new_budget:
        raise ContinuityError("give either --ledger-from or --new-budget, not both")
    if new_budget and not reason.strip():
        raise ContinuityError("--new-budget needs --reason: it is recorded in the new ledger")
    if reason and not new_budget:
        raise ContinuityError("--reason goes with --new-budget")
    if own.import_cut_short():
        if ledger_from is None:
            raise ContinuityError(
                f"{own.root}: an import of another ledger was cut short here: run the same "
                "join again, with its --ledger-from"
            )
        return  # `import_from` clears what it left and imports afresh
    if ledger_from is not None and _imported_last(own, ledger_from):
        return  # imported already; the rest of the join was cut short
    if _has_ledger(own) and (ledger_from is not None or new_budget):
        raise ContinuityError(
            f"{own.root} already holds a ledger: --ledger-from and --new-budget need a new folder"
        )


def _base(source: Path, fingerprint: str, dataset: str) -> frozenset[tuple[object, ...]]:
    """The spends a ledger this folder continues already holds (refused if it fails, or if
    it was moved to another folder that still holds the ledger continuing it)."""
    spends = _read(source, fingerprint)
    if spends.problems:
        raise ContinuityError(
            f"{source}: its ledger fails verification ({'; '.join(spends.problems[:3])}); "
            f"check it first: confide-client budget verify --dir {source}"
        )
    moved = spends.moved
    # A destination that lost its ledger (deleted, disk gone) continues nothing: this ledger
    # is then the newest record of the budget, and continuing it is the way back.
    if moved is not None and _has_ledger(Ledger(Path(moved))):
        raise ContinuityError(
            f"{source}: this ledger was moved to {moved}, which continues its budget: join "
            f"with --ledger-from {moved}"
        )
    names = {e.dataset for e in spends.entries}
    if names and dataset not in names:
        raise ContinuityError(
            f"{source} accounts this data under dataset {', '.join(sorted(names))}: join with "
            f"--dataset {sorted(names)[0]} to continue that budget"
        )
    return spends.rows


def plan_ledger(
    *,
    state: Path,
    data: Path,
    fingerprint: str,
    dataset: str,
    delta: float,
    ledger_from: Path | None = None,
    new_budget: bool = False,
    reason: str = "",
    index: LedgerIndex | None = None,
) -> LedgerPlan:
    """Decide what the ledger in `state` continues (see the module's docstring); reads
    ledgers and the index only, so it refuses before anything is registered."""
    own = Ledger(state)
    _check_flags(ledger_from, new_budget, reason, own)
    if ledger_from is not None and not Ledger(ledger_from).exists():
        raise ContinuityError(f"--ledger-from {ledger_from}: no ledger there")
    source = ledger_from.resolve() if ledger_from is not None else None
    excluded = {state.resolve(), *([source] if source else [])}
    others = _others(index or LedgerIndex(), fingerprint, excluded)
    if new_budget:
        return LedgerPlan(fingerprint, reason=reason, set_aside=tuple(o.folder for o in others))
    continued = source or (state if _has_ledger(own) else None)
    base = _base(continued, fingerprint, dataset) if continued is not None else frozenset()
    uncovered = _uncovered(others, base)
    if uncovered:
        raise ContinuityError(_refusal(data, fingerprint, uncovered, delta))
    return LedgerPlan(fingerprint, source=source)


def prepare_ledger(state: Path, plan: LedgerPlan) -> None:
    """Before contacting the coordinator: import the ledger (unless a join cut short did)
    or record the new budget."""
    ledger = Ledger(state)
    if plan.source is not None:
        if not (ledger.exists() and _imported_last(ledger, plan.source)):
            ledger.import_from(plan.source)
    elif plan.reason is not None:
        note = {
            "reason": plan.reason,
            "fingerprint": plan.fingerprint,
            "set_aside": [str(folder) for folder in plan.set_aside],
        }
        ledger.open().note("new-budget", json.dumps(note))


def undo_ledger(state: Path, plan: LedgerPlan) -> None:
    """The coordinator refused: remove the ledger `prepare_ledger` made (nothing trained on
    it; a later join decides again)."""
    if plan.source is None and plan.reason is None:
        return
    ledger = Ledger(state)
    for path in (ledger.path, ledger.mark_path, ledger.key_path):
        path.unlink(missing_ok=True)


def mark_moved(state: Path, plan: LedgerPlan) -> str | None:
    """After the coordinator accepted the join: the ledger `--ledger-from` named gets a
    'moved' entry naming `state`, so that it records no spend any more (its budget continues
    here, and a round recorded there would not reach it). A warning if that failed."""
    if plan.source is None:
        return None
    note = json.dumps({"to": str(state.resolve())})
    try:
        Ledger(plan.source).note("moved", note)
    except (LedgerError, OSError) as error:
        return (
            f"warning: {plan.source}'s ledger could not be marked as moved here ({error}); "
            f"never train from {plan.source} again: its rounds would not count in {state}"
        )
    return None


def index_ledger(state: Path, plan: LedgerPlan) -> str | None:
    """Index the joined folder under its data's fingerprint; a warning if that failed."""
    try:
        LedgerIndex().add(plan.fingerprint, state)
    except LedgerIndexError as error:
        return f"warning: {error}; another folder on this data would not be refused"
    return None


def index_institution_ledger(folder: Path, fingerprints: Iterable[str]) -> str | None:
    """Index an institution's ledger folder under `fingerprints` (each data file a spend
    was recorded on); folders without institution.toml (a simulation's) are not indexed.

    Best effort, called after a spend was recorded (the ClientApp), at `rotate-key` and at
    `budget verify`: the spend stands whether or not the index can be written (a read-only
    home, say), so a failure is logged and returned as a warning, never raised.
    """
    if not InstitutionDir(folder).settings_file.is_file():
        return None
    index = LedgerIndex()
    for fingerprint in dict.fromkeys(fingerprints):
        try:
            index.add(fingerprint, folder)
        except LedgerIndexError as error:
            _log.warning("privacy ledger %s not indexed: %s", folder, error)
            return f"warning: {error}; another folder on this data would not be refused"
    return None


def index_folder(folder: Path) -> str | None:
    """Index an institution's folder under every data file its ledger spent on (read only;
    a ledger that cannot be read is not indexed: its own use reports why)."""
    try:
        entries = Ledger(folder).entries(read_only=True)
    except LedgerError:
        return None
    return index_institution_ledger(folder, (e.fingerprint for e in entries if e.kind == "spend"))
