"""One privacy budget per dataset, whatever folder or key an institution uses.

A ledger lives in the institution's folder, so joining again into a new folder would start
counting the same data's privacy spend from zero. `join` therefore decides, before it
contacts the coordinator, what the new folder's ledger continues:

- nothing: no other ledger on this host spent on this data (by its fingerprint, via the
  host's `LedgerIndex`), or the folder already holds the ledger that did;
- `--ledger-from DIR`: the folder's ledger becomes a copy of DIR's (an 'import' entry);
- `--new-budget --reason`: a new budget on purpose (a 'new-budget' entry with the reason).

Anything else is refused, naming the other ledgers, their spend and both ways out. A ledger
that fails verification refuses too: what it spent cannot be known.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from confide.privacy.accounting import epsilon
from confide.privacy.ledger import Entry, Ledger, LedgerError
from confide.privacy.ledger_index import LedgerIndex, LedgerIndexError


class ContinuityError(RuntimeError):
    """`join` must not start this folder's budget as asked; the message says why and how."""


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

    def supersedes(self, other: _Spends) -> bool:
        """This ledger holds every spend of `other`, and more or by importing it."""
        return other.rows < self.rows or (
            other.rows == self.rows and other.folder in self.imported_from
        )


def _read(folder: Path, fingerprint: str) -> _Spends:
    """The verified spends of `folder`'s ledger on `fingerprint`."""
    ledger = Ledger(folder)
    try:
        problems = ledger.verify()
        entries = [] if problems else ledger.entries()
    except LedgerError as error:
        problems = [str(error)]
    if problems:
        return _Spends(folder, frozenset(), problems=tuple(problems))
    mine = tuple(e for e in entries if e.kind == "spend" and e.fingerprint == fingerprint)
    # A spend is the same in a copy of the ledger: compare what was spent, not the MACs
    # (a resealed copy is re-signed).
    rows = frozenset((e.recorded_at, *e.history_entry, e.run, e.round, e.dataset) for e in mine)
    sources = frozenset(
        Path(json.loads(e.note)["from"]).resolve() for e in entries if e.kind == "import"
    )
    return _Spends(folder, rows, entries=mine, imported_from=sources)


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


def _describe(spends: _Spends, delta: float) -> str:
    if spends.problems:
        return f"  {spends.folder}: its ledger fails verification ({spends.problems[0]})"
    spent = epsilon([e.history_entry for e in spends.entries], delta)
    datasets = ", ".join(sorted({e.dataset for e in spends.entries}))
    return (
        f"  {spends.folder}: epsilon {spent:.3f} spent at delta {delta:g} over "
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


def _check_flags(ledger_from: Path | None, new_budget: bool, reason: str, own: Ledger) -> None:
    if ledger_from is not None and new_budget:
        raise ContinuityError("give either --ledger-from or --new-budget, not both")
    if new_budget and not reason.strip():
        raise ContinuityError("--new-budget needs --reason: it is recorded in the new ledger")
    if reason and not new_budget:
        raise ContinuityError("--reason goes with --new-budget")
    if _has_ledger(own) and (ledger_from is not None or new_budget):
        raise ContinuityError(
            f"{own.root} already holds a ledger: --ledger-from and --new-budget need a new folder"
        )


def _base(source: Path, fingerprint: str, dataset: str) -> frozenset[tuple[object, ...]]:
    """The spends a ledger this folder continues already holds (refused if it fails)."""
    spends = _read(source, fingerprint)
    if spends.problems:
        raise ContinuityError(
            f"{source}: its ledger fails verification ({'; '.join(spends.problems[:3])}); "
            f"check it first: confide-client budget verify --dir {source}"
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
    """Before contacting the coordinator: import the ledger or record the new budget."""
    ledger = Ledger(state)
    if plan.source is not None:
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


def index_ledger(state: Path, plan: LedgerPlan) -> str | None:
    """Index the joined folder under its data's fingerprint; a warning if that failed."""
    try:
        LedgerIndex().add(plan.fingerprint, state)
    except LedgerIndexError as error:
        return f"warning: {error}; another folder on this data would not be refused"
    return None
