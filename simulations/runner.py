"""`confide-simulate run`: load, validate, simulate, report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from confide.simulations.scenario import ScenarioConfig, ScenarioError, load_scenario


class RunError(RuntimeError):
    """A run that cannot start or did not finish; the message is for the user."""


def shrink_to(tree: dict[str, Any], institutions: int, scenario: str) -> dict[str, Any]:
    """With `--institutions N`, cap the scenario's minimum counts at N."""
    base = load_scenario(scenario)
    federation = dict(tree.get("federation", {}))
    for field in ("min_available", "min_train", "min_evaluate"):
        federation[field] = min(getattr(base.federation, field), institutions)
    return tree | {"federation": federation}


def prepare(scenario: str, tree: dict[str, Any], shrink_minimums: bool) -> ScenarioConfig:
    try:
        if shrink_minimums:
            tree = shrink_to(tree, tree["simulation"]["institutions"], scenario)
        return load_scenario(scenario, tree)
    except ScenarioError as error:
        raise RunError(str(error)) from None


def run_and_report(
    scenario_name: str,
    tree: dict[str, Any],
    out: Path,
    *,
    console: Console,
    quiet: bool = False,
    verbose: bool = False,
    shrink_minimums: bool = False,
) -> tuple[Path, dict[str, Any]]:
    from confide.simulations import display
    from confide.simulations.engine import run_scenario
    from confide.simulations.report import run_directory, write_run
    from confide.tasks.datasets import DatasetError
    from confide.tasks.partition import PartitionError

    scenario = prepare(scenario_name, tree, shrink_minimums)
    dp = scenario.privacy.enabled
    console.print(
        f"[bold]{scenario.name}[/]: {scenario.simulation.institutions} institutions, "
        f"{scenario.federation.rounds} rounds, task {scenario.task.name}, "
        + (
            f"DP-SGD (target epsilon {scenario.privacy.target_epsilon:g}, delta "
            f"{scenario.privacy.delta:g})"
            if dp and scenario.privacy.target_epsilon
            else f"DP-SGD (sigma {scenario.privacy.noise_multiplier})"
            if dp
            else "no DP"
        )
        + f", seed {scenario.seed}"
    )

    def show_split(split) -> None:
        if not quiet:
            display.partition_table(console, split)

    try:
        if quiet or verbose:
            outcome = run_scenario(scenario, verbose=verbose, on_split=show_split)
        else:
            with display.RoundProgress(console, scenario.federation.rounds, dp) as progress:
                outcome = run_scenario(scenario, observer=progress, on_split=show_split)
    except (DatasetError, PartitionError) as error:
        raise RunError(str(error)) from None
    except RuntimeError as error:
        raise RunError(str(error)) from None
    directory = run_directory(out, scenario)
    results = write_run(directory, scenario, outcome)
    display.summary(console, results, str(directory))
    return directory, results
