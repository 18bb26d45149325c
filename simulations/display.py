"""Terminal output of a simulation: partition table, live round progress, final summary."""

from __future__ import annotations

import statistics

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from confide.server.history import JobHistory, RoundRecord
from confide.server.results import InstitutionRow, Results
from confide.simulations.adversity import describe as describe_adversity
from confide.tasks.splits import FederatedSplit

FULL_TABLE_LIMIT = 20


def partition_table(console: Console, split: FederatedSplit) -> None:
    rows = split.table
    if len(rows) > FULL_TABLE_LIMIT:
        sizes = [row.examples for row in rows]
        console.print(
            f"{len(rows)} institutions; examples per institution: min {min(sizes)}, "
            f"median {statistics.median(sizes):g}, max {max(sizes)} (all in partitions.json); "
            f"held-out test set: {len(split.test)}"
        )
        return
    table = Table(title=f"Data per institution (test set held out: {len(split.test)})")
    table.add_column("institution", justify="right")
    table.add_column("examples", justify="right")
    table.add_column("train / validation", justify="right")
    table.add_column("examples per label")
    for row, local in zip(rows, split.institutions, strict=True):
        table.add_row(
            str(row.institution),
            str(row.examples),
            f"{len(local.train)} / {len(local.validation)}",
            " ".join(f"{count:>3}" for count in row.labels),
        )
    console.print(table)


class RoundProgress:
    """A live bar: round r/R, last test accuracy and the largest epsilon so far."""

    def __init__(self, console: Console, rounds: int, dp: bool) -> None:
        self.dp = dp
        self.console = console
        # Without a terminal (CI, a pipe) a live bar is noise: print one line per round.
        self.live = console.is_terminal
        self.rounds = rounds
        self.progress = Progress(
            TextColumn("[bold]round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not self.live,
        )
        self.task = self.progress.add_task(
            "rounds", total=rounds, status="starting Ray and the first round..."
        )

    def __enter__(self) -> RoundProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, record: RoundRecord, history: JobHistory) -> None:
        status = f"accuracy {record.accuracy:.4f}  loss {record.loss:.4f}"
        if self.dp:
            status += f"  max epsilon {record.epsilon_max:.3f}"
        status += f"  ({record.seconds:.2f}s)"
        if self.live:
            self.progress.update(self.task, completed=record.round, status=status)
        else:
            self.console.print(f"round {record.round}/{self.rounds}: {status}", highlight=False)


def _ledger_epsilon(row: InstitutionRow) -> str:
    value = row.dataset_epsilon
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.3f} @ {row.dataset_delta:g}"


def _number(value: float | None, spec: str) -> str:
    """`value` formatted, or "-" for a number results.json holds as null."""
    return "-" if value is None else format(value, spec)


def _institution_table(console: Console, institutions: list[InstitutionRow]) -> None:
    if len(institutions) > FULL_TABLE_LIMIT:
        spent = [row.epsilon or 0.0 for row in institutions]
        trained = sum(1 for row in institutions if row.rounds_trained)
        console.print(
            f"{trained} of {len(institutions)} institutions trained; epsilon per "
            f"institution: min {min(spent):.3f}, median {statistics.median(spent):.3f}, "
            f"max {max(spent):.3f} (each one in results.json)"
        )
        return
    table = Table(title="Privacy spent per institution")
    for column in (
        "institution",
        "examples",
        "rounds",
        "epsilon",
        "delta",
        "sigma",
        "q",
        "steps",
        "ledger epsilon (all runs)",
    ):
        table.add_column(column, justify="right")
    for row in institutions:
        table.add_row(
            str(row.id),
            str(row.examples),
            str(row.rounds_trained),
            _number(row.epsilon, ".3f"),
            _number(row.delta, "g"),
            f"{row.noise_multiplier:.3f}" if row.noise_multiplier else "-",
            f"{row.sample_rate:.4f}" if row.sample_rate else "-",
            str(row.steps),
            _ledger_epsilon(row),
        )
    console.print(table)


def summary(console: Console, results: Results, directory: str) -> None:
    """The end of a run: final metrics, privacy at both levels, refusals, timing."""
    final = results.final
    console.print(
        f"\n[bold]Final test accuracy {final.accuracy:.4f}[/]  loss "
        f"{_number(final.loss, '.4f')}  macro-F1 {final.f1_macro:.4f}"
    )
    privacy = results.privacy
    if results.dp:
        console.print(
            f"Privacy (sample level, {str(privacy.accountant).upper()} accountant): "
            f"max epsilon {_number(final.epsilon_max, '.3f')} at delta "
            f"{_number(final.delta, 'g')}"
        )
        _institution_table(console, results.institutions)
    else:
        console.print(
            "Privacy at sample level: none (DP-SGD off) - the institutions' updates carry no "
            "(epsilon, delta) guarantee for individual records."
        )
    central = privacy.institution_level
    if central:
        console.print(
            f"Privacy (institution level, central DP, RDP accountant): epsilon "
            f"{central.epsilon:.3f} at delta {central.delta:g}",
            highlight=False,
        )
    console.print(f"Privacy report: {privacy.report}", highlight=False)
    if (adversity := describe_adversity(results)) is not None:
        console.print(adversity, highlight=False)
    if results.stopped:
        console.print(f"[bold yellow]stopped early:[/] {results.stopped}", highlight=False)
    rejected = results.rejected_updates
    if rejected:
        console.print(
            f"[bold yellow]warning:[/] {len(rejected)} update(s) or replies were refused or "
            f"failed; first: institution {rejected[0].institution}: {rejected[0].reason} "
            "(all in results.json, rejected_updates)"
        )
    timing = results.timing
    console.print(
        f"{len(results.rounds)} rounds in {timing.total_seconds:.1f}s "
        f"(first {timing.first_round_seconds:.1f}s with Ray start-up, then median "
        f"{timing.median_round_seconds:.2f}s)"
    )
    console.print(f"Results: {directory}")
