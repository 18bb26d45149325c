"""Aggregation rules by name: fedavg's arithmetic, and the registry refusing unknown names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from confide.common.config import ConfigFileError, validate_file
from confide.common.errors import ScenarioError
from confide.server.aggregation import RULES, FedAvgRule, Update, aggregation_rule
from confide.server.job import JobConfig, JobFile


def record(**arrays: list[float]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.array(value, np.float32)) for name, value in arrays.items()})


CURRENT = record(w=[0.0, 0.0], b=[0.0])


def test_fedavg_weights_each_model_by_its_declared_size():
    # By hand: weights 1, 3 (of 4): w = (1 * [1, 2] + 3 * [5, 6]) / 4 = [4, 5],
    # b = (1 * 10 + 3 * 2) / 4 = 4.
    updates = [
        Update("a", record(w=[1.0, 2.0], b=[10.0]), weight=1),
        # Array order differs from the first update's: names decide, not positions.
        Update("b", record(b=[2.0], w=[5.0, 6.0]), weight=3),
    ]
    result = FedAvgRule().aggregate(CURRENT, updates, asked=5, server_round=1)
    assert result is not None
    assert np.allclose(result["w"].numpy(), [4.0, 5.0]) and np.allclose(result["b"].numpy(), 4.0)
    assert result["w"].numpy().dtype == np.float32


def test_fedavg_without_any_update_leaves_the_model_unchanged():
    assert FedAvgRule().aggregate(CURRENT, [], asked=3, server_round=1) is None


def test_fedavg_under_central_dp_sums_unweighted_over_those_asked():
    changes = [[np.array([1.0, 2.0])], [np.array([3.0, -1.0])]]
    total, divisor = FedAvgRule().central_sum(changes, like=[np.zeros(2)], asked=4)
    assert np.array_equal(total[0], [4.0, 1.0]) and divisor == 4
    empty, _ = FedAvgRule().central_sum([], like=[np.zeros(2)], asked=4)
    assert np.array_equal(empty[0], [0.0, 0.0])


def test_the_registry_names_its_rules_and_refuses_an_unknown_one():
    assert isinstance(aggregation_rule("fedavg"), FedAvgRule)
    assert set(RULES) == {"fedavg"}
    with pytest.raises(ValueError, match="unknown aggregation rule 'krum'; allowed: fedavg"):
        aggregation_rule("krum")


def test_a_job_file_with_an_unknown_rule_is_refused_with_the_allowed_names():
    assert JobConfig().aggregation.rule == "fedavg"
    with pytest.raises(ConfigFileError) as refused:
        validate_file(
            {"aggregation": {"rule": "median"}}, JobFile, path=Path("job.toml"), what="job"
        )
    assert "aggregation.rule: Value error, unknown aggregation rule 'median'" in str(refused.value)
    assert "allowed: fedavg" in str(refused.value)


def test_a_scenario_with_an_unknown_rule_is_refused_like_any_bad_field():
    from confide.simulations.scenario import load_scenario

    scenario = load_scenario("digits-dp", {"aggregation": {"rule": "fedavg"}})
    assert scenario.job().aggregation.rule == "fedavg"
    with pytest.raises(ScenarioError, match="unknown aggregation rule 'mean'; allowed: fedavg"):
        load_scenario("digits-dp", {"aggregation": {"rule": "mean"}})
