"""Job configuration: the Flower app's run config and the round instructions."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict
from pydantic import ValidationError

from confide.privacy.instructions import RoundInstructions
from confide.server.job import JobConfig

PYPROJECT = Path(__file__).parents[3] / "pyproject.toml"


def test_flower_app_run_config_in_pyproject_is_a_valid_job():
    from confide.server.app import DEFAULT_RESULTS, RESULTS_KEY, job_from_run_config

    project = tomllib.loads(PYPROJECT.read_text())
    run_config = flatten_dict(project["tool"]["flwr"]["app"]["config"])
    name, job = job_from_run_config(run_config)
    assert name == "job" and job.task.name == "digits"
    assert job.federation.rounds >= 1
    # Declared, so that `flwr run . --run-config` may set it (Flower refuses undeclared keys).
    assert run_config[RESULTS_KEY] == DEFAULT_RESULTS


def test_flower_app_components_point_at_confide_apps():
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from confide.client.app import app as client_app
    from confide.server.app import app as server_app

    components = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "confide.server.app:app",
        "clientapp": "confide.client.app:app",
    }
    assert isinstance(server_app, ServerApp) and isinstance(client_app, ClientApp)


def test_instructions_carry_the_job_to_institutions():
    job = JobConfig.model_validate(
        {"seed": 4, "federation": {"rounds": 7}, "privacy": {"target_epsilon": 3.0}}
    )
    instructions = RoundInstructions.from_config(job.instructions().to_config())
    assert instructions.rounds == 7 and instructions.seed == 4
    assert instructions.privacy.target_epsilon == 3.0
    assert instructions.task == job.task and instructions.train == job.train


def test_min_train_above_min_available_is_refused():
    with pytest.raises(ValidationError, match="min_train"):
        JobConfig.model_validate({"federation": {"min_train": 5, "min_available": 2}})
