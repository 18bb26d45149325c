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
    from confide.server.checkpoint import Checkpoint
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
    baseline: bool = True,
    resume: Path | None = None,
) -> tuple[Path, Results]:
    """Run a scenario and write its results; the virtual institutions' ledgers go to `state`
    (by default the run folder's `state/`), so a later run given it continues their spend.
    With `[attack]` or `[faults]` and `baseline`, a clean twin then prices them
    (confide.simulations.adversity).

    The run checkpoints into its folder after every round (deleted once its results are
    written); `resume`, an interrupted run's folder, finishes that run from its checkpoint,
    with the scenario and ledgers saved there (`scenario_name`, `tree` and `state` unused),
    into that folder, with the model an uninterrupted run would have ended with."""
    from confide.simulations import adversity, display
    from confide.simulations.engine import SimulationError, run_scenario
    from confide.simulations.report import run_directory, write_run
    from confide.tasks.datasets import DatasetError
    from confide.tasks.partition import PartitionError

    resumed = resumed_run(resume) if resume is not None else None
    scenario = resumed[0] if resumed else prepare(scenario_name, tree, fit_minimums)
    console.print(
        f"[bold]{scenario.name}[/]: {scenario.simulation.institutions} institutions, "
        f"{scenario.federation.rounds} rounds, task {scenario.task.name}, "
        f"{scenario.privacy.describe()}, seed {scenario.seed}",
        highlight=False,
    )
    continued = continued_ledgers(scenario, console) if state is None and not resumed else None
    try:  # before the simulation: an unwritable --out must not cost a whole run
        directory = resume if resume is not None else run_directory(out, scenario)
    except OSError as error:
        raise RunError(f"--out {out}: cannot create the results folder: {error}") from None
    saved = Path(resumed[1].ledgers) if resumed and resumed[1].ledgers else None
    ledgers = saved or state or continued or directory / "state"
    checkpoint = resumed[1] if resumed else None
    if checkpoint is not None:
        console.print(f"resuming {directory} after round {checkpoint.round}", highlight=False)
    # A resumed run's twin would have to start from the ledgers before its first part.
    twin = baseline and checkpoint is None and adversity.adverse(scenario)
    start = adversity.snapshot(ledgers) if twin else None  # the twin starts where this run does

    def show_split(split: FederatedSplit) -> None:
        if not quiet:
            display.partition_table(console, split)

    try:
        if quiet or verbose:
            outcome = run_scenario(
                scenario,
                verbose=verbose,
                on_split=show_split,
                state=ledgers,
                checkpoint=directory,
                resume=checkpoint,
            )
        else:
            with display.RoundProgress(
                console, scenario.federation.rounds, scenario.privacy.enabled
            ) as progress:
                outcome = run_scenario(
                    scenario,
                    observer=progress,
                    on_split=show_split,
                    state=ledgers,
                    checkpoint=directory,
                    resume=checkpoint,
                )
        results = write_run(directory, scenario, outcome, ledgers=ledgers)
        finished_checkpoint(directory)
    except (DatasetError, PartitionError, SimulationError, OSError) as error:
        if not any(directory.iterdir()):
            shutil.rmtree(directory, ignore_errors=True)
        raise RunError(str(error)) from None
    if twin:
        results = adversity.price_run(scenario, results, directory, start=start, console=console)
    display.summary(console, results, str(directory))
    return directory, results


def resumed_run(folder: Path) -> tuple[ScenarioConfig, Checkpoint]:
    """The scenario and checkpoint of the interrupted run in `folder`; RunError if it
    finished (its results.json exists) or its checkpoint cannot be used."""
    from confide.common.errors import CheckpointError
    from confide.server.checkpoint import CheckpointStore
    from confide.server.results import RESULTS

    if (folder / RESULTS).is_file():
        raise RunError(f"--resume {folder}: that run finished (its {RESULTS} is there)")
    store = CheckpointStore.in_folder(folder)
    try:
        checkpoint = store.load(folder.resolve().name)
        if checkpoint.scenario is None:
            raise CheckpointError(f"{store.path} holds no scenario: not a simulation's")
        scenario = ScenarioConfig.model_validate_json(checkpoint.scenario)
        checkpoint.check_job(scenario.job())
    except CheckpointError as error:
        raise RunError(f"--resume {folder}: {error}") from None
    return scenario, checkpoint


def finished_checkpoint(folder: Path) -> None:
    """The run's results are written: its checkpoint and key go (a finished run is not
    resumed)."""
    from confide.server.checkpoint import CheckpointStore

    store = CheckpointStore.in_folder(folder)
    store.remove()
    store.key.unlink(missing_ok=True)
