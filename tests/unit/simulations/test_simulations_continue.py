"""A simulation continues a saved model only where its privacy accounting stays whole: the
same task, inputs and classes, and, for a simulated model on its own task, the very ledgers
that recorded the data it was trained on (checked by the institutions' data commitments)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confide.common.errors import SimulationError
from confide.privacy.ledger import Ledger
from confide.simulations.engine import starting_model
from confide.simulations.scenario import load_scenario


def _scenario(model: Path, **overrides: object):  # type: ignore[no-untyped-def]
    tree = {"model": {"init": str(model)}, "simulation": {"institutions": 3}} | overrides
    return load_scenario("digits-dp", tree, fit_minimums=True)


@pytest.fixture
def continued(saved_model, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A saved digits model whose card says three virtual institutions trained it, each
    committed to its data under its ledger in tmp_path/ledgers."""
    saved_model(tmp_path / "model")
    scenario = _scenario(tmp_path / "model" / "model.safetensors")
    source = scenario.data_source(tmp_path / "ledgers")
    rows = []
    for index in range(3):
        ledger = Ledger(tmp_path / "ledgers" / f"institution-{index}")
        ledger.create()
        rows.append(
            {
                "id": index,
                "rounds_trained": 1,
                "epsilon": 1.0,
                "delta": 1e-5,
                "dataset_epsilon": 1.0,
                "dataset_delta": 1e-5,
                "dataset_accountant": "rdp",
                "data_commitment": ledger.commitment(source.fingerprint(index)),
            }
        )
    document = json.loads((tmp_path / "model" / "model.json").read_text())
    document["privacy"]["institutions"] = rows
    (tmp_path / "model" / "model.json").write_text(json.dumps(document))
    return tmp_path / "model" / "model.safetensors"


def test_the_runs_own_ledgers_and_split_continue_its_model(continued, tmp_path):
    scenario = _scenario(continued)
    source = scenario.data_source(tmp_path / "ledgers")
    weights, lineage = starting_model(scenario, source, source.split())
    assert weights is not None and set(weights) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert [a.source for a in lineage] == [str(continued)]


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 5},  # another partition: records would move between ledgers
        {"data": {"test_fraction": 0.3}},
    ],
)
def test_a_different_split_of_the_same_data_is_refused(continued, tmp_path, change):
    scenario = _scenario(continued, **change)
    source = scenario.data_source(tmp_path / "ledgers")
    with pytest.raises(SimulationError, match="does not continue the ledger"):
        starting_model(scenario, source, source.split())


def test_fresh_ledgers_are_refused_they_would_count_the_data_from_zero(continued, tmp_path):
    scenario = _scenario(continued)
    source = scenario.data_source(tmp_path / "fresh")
    with pytest.raises(SimulationError, match="its earlier spend would not count"):
        starting_model(scenario, source, source.split())


def test_another_architecture_or_task_is_refused_before_ray_starts(continued, tmp_path):
    for change, field in (
        ({"task": {"name": "digits", "model": {"hidden": [8]}}}, "task.model"),
        ({"task": {"name": "breast-cancer"}}, "task.name"),
    ):
        scenario = _scenario(continued, **change)
        source = scenario.data_source(tmp_path / "ledgers")
        with pytest.raises(SimulationError, match=field.replace(".", r"\.")):
            starting_model(scenario, source, source.split())
