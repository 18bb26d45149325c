"""What a simulation leaves behind: results.json, the resolved scenario, partitions, plots and
the trained model (model.safetensors with its card, model.json)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from confide.common.files import write_atomic
from confide.privacy.report import PrivacyReport
from confide.server import results
from confide.server.model_file import model_for_run
from confide.server.results import PARTITIONS, InstitutionRow, Results, institution_row
from confide.simulations import adversity
from confide.simulations.engine import SimulationOutcome
from confide.simulations.scenario import ScenarioConfig
from confide.tasks.partition import Partitions

SCENARIO = "scenario.toml"


def run_directory(root: Path, scenario: ScenarioConfig) -> Path:
    """`<root>/<scenario>-<UTC timestamp>`, made unique if two runs start in one second."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        suffix = f"-{attempt}" if attempt else ""
        path = root / f"{scenario.name}-{stamp}{suffix}"
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise OSError(f"1000 run folders for {scenario.name} in one second under {root}")


def institution_rows(scenario: ScenarioConfig, outcome: SimulationOutcome) -> list[InstitutionRow]:
    history, split = outcome.history, outcome.split
    declared = scenario.declared_sizes(split)
    return [
        institution_row(
            index,
            scenario.privacy,
            history,
            key=str(index),
            examples=len(local.train),
            declared_examples=declared[index],
            validation_examples=len(local.validation),
        )
        for index, local in enumerate(split.institutions)
    ]


def build_results(
    scenario: ScenarioConfig, outcome: SimulationOutcome, *, ledgers: Path | None = None
) -> tuple[Results, PrivacyReport]:
    """(results.json, privacy.json) of a finished simulation; `ledgers` is where the virtual
    institutions' ledgers are (named in the results)."""
    institutions = institution_rows(scenario, outcome)
    history = outcome.history
    report = results.privacy_document(
        scenario.name, scenario, history, institutions=institutions, simulated=True
    )
    document = results.build_results(
        scenario.name,
        scenario,
        history,
        institutions=institutions,
        report=report,
        total_seconds=outcome.seconds,
        peak_rss_mb=outcome.peak_rss_bytes / 2**20,
        ledgers=str(ledgers) if ledgers is not None else None,
    )
    # [attack] and [faults]: who attacked and the faults met (simulation only).
    document = document.model_copy(update=adversity.records(scenario, outcome.faults))
    return document, report


def write_run(
    directory: Path,
    scenario: ScenarioConfig,
    outcome: SimulationOutcome,
    *,
    ledgers: Path | None = None,
) -> Results:
    """Write every artefact of a finished run into `directory`; return its results.
    `ledgers` is where the virtual institutions' ledgers are (named in the results)."""
    document, report = build_results(scenario, outcome, ledgers=ledgers)
    write_atomic(directory / PARTITIONS, Partitions(outcome.split.table).to_json())
    resolved = scenario.model_dump(mode="json", exclude_none=True)
    model = model_for_run(
        outcome.history,
        document,
        job=scenario,
        kind="simulation",
        run=directory.name,
        lineage=outcome.lineage,
        ledgers=str(ledgers.resolve()) if ledgers is not None else None,
    )
    return results.write_results(
        directory,
        document,
        outcome.history,
        config=(SCENARIO, resolved),
        privacy=report,
        model=model,
    )
