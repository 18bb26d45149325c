"""The institution's `/metrics`: what `confide-client start` shows its own Prometheus.

The figures are the institution's ledger as `confide-client budget` reads it (verified
first; epsilon at the institution's `max_delta` with its `[privacy] accountant`, named by the
`accountant` label, limit `max_epsilon`), computed on each scrape: the ClientApp records each
round in the ledger from confide's runner, another process, so nothing is counted in memory
here. The ledger and the settings are read again only when one of their files changed, and
then once (`read_only_budget`: one verification of the chain).

Read-only: a scrape writes nothing in the institution's folder. A ledger never created (an
institution that never trained) is read as empty, not created; a creation or reseal cut short
is not finished here (the next round's write does that).

Refusals: what the institution itself recorded as refused, the ledger's event entries
(`confide.privacy.ledger.EVENT_KINDS`): `refused-app` (reason `app`), a run whose app is
not confide's own ClientApp (one entry per run and runner, not per round), and
`refused-round` (reason `round`), a round its limits refused (the runner records it). A round
refused because the ledger itself is unusable cannot be recorded in it: that shows as
`confide_client_ledger_verified 0`.

Every metric is documented in docs/deployment.md ("Metrics"), which `METRICS` must match.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from confide.client.budget import BudgetLine, read_only_budget
from confide.client.institution import METRICS_PORT as METRICS_PORT
from confide.client.institution import SETTINGS
from confide.common.errors import ConfideError
from confide.privacy.ledger import EVENT_KINDS, Ledger, LedgerTampered

# Each event kind the ledger records, as the `reason` of a refusal.
REASONS = {kind: kind.removeprefix("refused-") for kind in EVENT_KINDS}
RETRY_SECONDS = 0.2  # a scrape that met a round being recorded reads once more

# Every metric this collector exports: name (as exposed, with `_total` for counters) -> type.
METRICS = {
    "confide_client_ledger_verified": "gauge",
    "confide_client_epsilon_spent": "gauge",
    "confide_client_epsilon_limit": "gauge",
    "confide_client_epsilon_remaining": "gauge",
    "confide_client_delta": "gauge",
    "confide_client_rounds_trained_total": "counter",
    "confide_client_jobs_trained": "gauge",
    "confide_client_refusals_total": "counter",
}


@dataclass(frozen=True)
class LedgerFigures:
    """What a scrape shows: the budget per dataset and the refusals by reason, or None for
    both when the ledger failed verification or could not be read."""

    lines: list[BudgetLine] | None
    refusals: Counter[str]


class InstitutionCollector(Collector):
    """The institution's metrics (module docstring); scrapes take turns."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[int, int], ...] | None = None
        self._figures = LedgerFigures(None, Counter())

    def figures(self) -> LedgerFigures:
        """The ledger's figures, read again when its files or the settings changed."""
        stamp = self._files_stamp()
        if stamp != self._stamp:
            try:
                figures = self._read()
            except LedgerTampered:
                time.sleep(RETRY_SECONDS)  # a round recorded, its mark not yet moved on?
                stamp, figures = self._files_stamp(), self._read_or_none()
            except (ConfideError, OSError):
                figures = LedgerFigures(None, Counter())
            self._stamp, self._figures = stamp, figures
        return self._figures

    def _files_stamp(self) -> tuple[tuple[int, int], ...]:
        ledger, stamps = Ledger(self.root), []
        for path in (ledger.path, ledger.mark_path, ledger.key_path, self.root / SETTINGS):
            try:
                status = path.stat()
                stamps.append((status.st_mtime_ns, status.st_size))
            except OSError:
                stamps.append((0, -1))
        return tuple(stamps)

    def _read(self) -> LedgerFigures:
        lines, entries = read_only_budget(self.root)
        refusals = Counter(REASONS[e.kind] for e in entries if e.kind in REASONS)
        return LedgerFigures(lines, refusals)

    def _read_or_none(self) -> LedgerFigures:
        try:
            return self._read()
        except (ConfideError, OSError):
            return LedgerFigures(None, Counter())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            figures = self.figures()
        yield GaugeMetricFamily(
            "confide_client_ledger_verified",
            "1 if the privacy ledger verified at the last read; 0: it failed verification or "
            "could not be read (`confide-client budget verify`), and no spend is shown.",
            value=float(figures.lines is not None),
        )
        if figures.lines is None:
            return
        yield from _budget_metrics(figures.lines)
        refusals = CounterMetricFamily(
            "confide_client_refusals",
            "Refusals the institution recorded in its ledger, by reason (app: a run whose "
            "app is not confide's own ClientApp, once per run).",
            labels=["reason"],
        )
        for reason in sorted(set(REASONS.values())):
            refusals.add_metric([reason], figures.refusals[reason])
        yield refusals


def _budget_metrics(lines: list[BudgetLine]) -> Iterator[Metric]:
    spent = GaugeMetricFamily(
        "confide_client_epsilon_spent",
        "Sample-level epsilon the dataset spent over every job, at confide_client_delta, "
        "with the institution's accountant (named); +Inf after training without DP.",
        labels=["dataset", "accountant"],
    )
    limit = GaugeMetricFamily(
        "confide_client_epsilon_limit",
        "The institution's limit ([privacy] max_epsilon).",
        labels=["dataset"],
    )
    remaining = GaugeMetricFamily(
        "confide_client_epsilon_remaining",
        "Limit minus spent, at least 0: a round that would pass the limit is refused.",
        labels=["dataset"],
    )
    delta = GaugeMetricFamily(
        "confide_client_delta",
        "The delta the dataset's epsilon is stated at ([privacy] max_delta).",
        labels=["dataset"],
    )
    rounds = CounterMetricFamily(
        "confide_client_rounds_trained",
        "Rounds trained on the dataset, every job (the ledger's spend entries).",
        labels=["dataset"],
    )
    jobs = GaugeMetricFamily(
        "confide_client_jobs_trained", "Jobs that trained on the dataset.", labels=["dataset"]
    )
    for line in lines:
        labels = [line.dataset]
        spent.add_metric([line.dataset, line.accountant], line.epsilon)
        delta.add_metric(labels, line.delta)
        rounds.add_metric(labels, line.rounds)
        jobs.add_metric(labels, line.jobs)
        if line.max_epsilon is not None and line.remaining is not None:
            limit.add_metric(labels, line.max_epsilon)
            remaining.add_metric(labels, line.remaining)
    yield from (spent, limit, remaining, delta, rounds, jobs)
