"""`confide-simulate run`: load, validate, simulate, report."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from confide.common.errors import ModelFileError, RunError
from confide.simulations.scenario import ScenarioConfig, ScenarioError, load_scenario
from confide.tasks.splits import FederatedSplit

if TYPE_CHECKING:
    from confide.server.results import Results


def prepare(scenario: str, tree: dict[str, Any], fit_minimums: bool) -> ScenarioConfig:
    try:
        return load_scenario(scenario, tree, fit_minimums=fit_minimums)
    except ScenarioError as error:
        raise RunError(str(error)) from None


def continued_ledgers(scenario: ScenarioConfig, console: Console) -> Path | None:
    """The ledgers a run that continues a simulated model records in by default: those of the
    run that trained it, so that continuing a model never resets its institutions' epsilon.
    None if the scenario continues no simulated model."""
    from confide.server.model_file import read_card

    if scenario.model.init is None or scenario.model.registered_init() is not None:
        return None
    try:
        card = read_card(Path(scenario.model.init))
    except ModelFileError as error:
        raise RunError(f"model.init: {error}") from None
    console.print(f"continuing the model of {card.describe()}", highlight=False)
    if card.run.kind != "simulation" or card.run.ledgers is None:
        return None
    ledgers = Path(card.run.ledgers)
    if not ledgers.is_dir():
        raise RunError(
            f"model.init: the run that trained this model kept its institutions' ledgers in "
            f"{ledgers}, which is gone; give --state to say which ledgers this run continues"
        )
    console.print(f"its virtual institutions' ledgers: {ledgers}", highlight=False)
    return ledgers


def run_and_report(
    scenario_name: str,
    tree: dict[str, Any],
    out: Path,
    *,
    console: Console,
    quiet: bool = False,
    verbose: bool = False,
    fit_minimums: bool = False,
    state: Path | None = None,
) -> tuple[Path, Results]:
    """Run a scenario and write its results; the virtual institutions' ledgers go to `state`
    (by default the run folder's `state/`), so a later run given it continues their spend."""
    from confide.simulations import display
    from confide.simulations.engine import SimulationError, run_scenario
    from confide.simulations.report import run_directory, write_run
    from confide.tasks.datasets import DatasetError
    from confide.tasks.partition import PartitionError

    scenario = prepare(scenario_name, tree, fit_minimums)
    console.print(
        f"[bold]{scenario.name}[/]: {scenario.simulation.institutions} institutions, "
        f"{scenario.federation.rounds} rounds, task {scenario.task.name}, "
        f"{scenario.privacy.describe()}, seed {scenario.seed}",
        highlight=False,
    )
    continued = continued_ledgers(scenario, console) if state is None else None
    try:  # before the simulation: an unwritable --out must not cost a whole run
        directory = run_directory(out, scenario)
    except OSError as error:
        raise RunError(f"--out {out}: cannot create the results folder: {error}") from None
    ledgers = state or continued or directory / "state"

    def show_split(split: FederatedSplit) -> None:
        if not quiet:
            display.partition_table(console, split)

    try:
        if quiet or verbose:
            outcome = run_scenario(scenario, verbose=verbose, on_split=show_split, state=ledgers)
        else:
            with display.RoundProgress(
                console, scenario.federation.rounds, scenario.privacy.enabled
            ) as progress:
                outcome = run_scenario(
                    scenario, observer=progress, on_split=show_split, state=ledgers
                )
        results = write_run(directory, scenario, outcome, ledgers=ledgers)
    except (DatasetError, PartitionError, SimulationError, OSError) as error:
        if not any(directory.iterdir()):
            shutil.rmtree(directory, ignore_errors=True)
        raise RunError(str(error)) from None
    display.summary(console, results, str(directory))
    return directory, results
