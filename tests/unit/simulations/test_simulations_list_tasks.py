"""`confide-simulate list` shows the tasks a scenario can name: built-in and installed ones,
where each comes from, and why an installed one is refused."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from confide.simulations import scenario
from confide.simulations.cli import app


@pytest.fixture
def no_bundled_scenarios(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scenarios table is not under test; reading every bundled scenario takes seconds."""
    monkeypatch.setattr(scenario, "bundled_scenarios", dict)


def test_list_shows_built_in_and_installed_tasks_and_refusals(
    task_packages, no_bundled_scenarios, monkeypatch
):
    module = task_packages.module(
        """
        from confide.tasks.registry import Task

        def load(config, seed):
            raise AssertionError("not loaded")

        TASK = Task(name="listed-task", description="an installed one", loader=load)
        """
    )
    task_packages.install(
        "listed-tasks", "3.1", {"listed-task": f"{module}:TASK", "csv": f"{module}:TASK"}
    )
    monkeypatch.setenv("COLUMNS", "200")

    result = CliRunner().invoke(app, ["list"])

    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if "│" in line}
    assert "confide" in rows["digits"]
    assert "listed-tasks 3.1" in rows["listed-task"]
    assert "an installed one" in rows["listed-task"]
    assert "refused: task 'csv'" in result.output
    assert "'csv' is a built-in task" in result.output
