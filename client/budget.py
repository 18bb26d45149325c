"""An institution's privacy budget as its operator reads it: spent, limit, remaining.

The numbers come from the institution's ledger (verified first) and its own settings: the
limit is `[privacy] max_epsilon`, and epsilon is stated at its `max_delta` with its
`accountant`. A directory without settings (a simulated institution's) is read at the delta
and with the accountant the caller gives (1e-5 and RDP by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from confide.privacy.ledger import DEFAULT_DATASET, Entry, Ledger, spent_of

if TYPE_CHECKING:
    from confide.client.institution import InstitutionConfig


@dataclass(frozen=True)
class BudgetLine:
    dataset: str
    epsilon: float
    delta: float
    max_epsilon: float | None
    rounds: int
    jobs: int
    fingerprints: tuple[str, ...]
    accountant: str = "rdp"

    @property
    def remaining(self) -> float | None:
        if self.max_epsilon is None:
            return None
        return max(0.0, self.max_epsilon - self.epsilon)

    def as_json(self) -> dict[str, object]:
        def number(value: float | None) -> float | str | None:
            return "unbounded" if value is not None and math.isinf(value) else value

        return {
            "dataset": self.dataset,
            "epsilon": number(self.epsilon),
            "delta": self.delta,
            "max_epsilon": self.max_epsilon,
            "remaining": number(self.remaining),
            "rounds": self.rounds,
            "jobs": self.jobs,
            "fingerprints": list(self.fingerprints),
            "unit": "sample",
            "accountant": self.accountant,
        }


def budget(
    root: Path, delta: float | None = None, accountant: str | None = None
) -> list[BudgetLine]:
    """Every dataset in the ledger in `root`, plus the institution's own dataset if it has not
    spent anything yet. LedgerTampered if the ledger fails verification."""
    settings = _settings(root)
    ledger = Ledger(root)
    if not ledger.exists() and not ledger.key_path.exists() and settings is None:
        raise FileNotFoundError(f"{root}: no ledger here (nothing trained on this directory yet)")
    return budget_lines(ledger.open().entries(), settings, delta, accountant)


def _settings(root: Path) -> InstitutionConfig | None:
    from confide.client.institution import InstitutionDir

    directory = InstitutionDir(root)
    return directory.load() if directory.settings_file.is_file() else None


def read_only_budget(root: Path) -> tuple[list[BudgetLine], list[Entry]]:
    """`budget(root)` and the ledger's entries, read without writing anything: a ledger
    never created (or whose creation was cut short) is read as empty, not created. What
    /metrics shows (`confide.client.metrics`). LedgerTampered if the ledger fails
    verification."""
    entries = Ledger(root).entries(read_only=True)
    return budget_lines(entries, _settings(root)), entries


def budget_lines(
    entries: list[Entry],
    settings: InstitutionConfig | None,
    delta: float | None = None,
    accountant: str | None = None,
) -> list[BudgetLine]:
    """The budget of verified ledger `entries` under the institution's `settings` (None: a
    folder without any): epsilon at `delta` with `accountant`, the settings' by default."""
    if delta is None:
        delta = settings.privacy.max_delta if settings is not None else 1e-5
    if accountant is None:
        accountant = settings.privacy.accountant if settings is not None else "rdp"
    spent = {row.dataset: row for row in spent_of(entries, delta, accountant)}
    own = settings.dataset if settings is not None else DEFAULT_DATASET
    limit = settings.privacy.max_epsilon if settings is not None else None
    names = sorted(set(spent) | ({own} if settings is not None else set()))
    lines = []
    for name in names:
        row = spent.get(name)
        lines.append(
            BudgetLine(
                dataset=name,
                epsilon=row.epsilon if row else 0.0,
                delta=delta,
                max_epsilon=limit,
                rounds=row.rounds if row else 0,
                jobs=row.jobs if row else 0,
                fingerprints=row.fingerprints if row else (),
                accountant=accountant,
            )
        )
    return lines
