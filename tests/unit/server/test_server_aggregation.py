"""Aggregation rules by name and their settings: fedavg's arithmetic, the registry, the
`[aggregation]` parameters and their validation, and the coordinator's update norm bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from confide.common.config import ConfigFileError, validate_file
from confide.common.errors import ScenarioError
from confide.server.aggregation import (
    RULES,
    BulyanRule,
    FedAvgRule,
    KrumRule,
    MedianRule,
    MultiKrumRule,
    TrimmedMeanRule,
    Update,
    aggregation_rule,
    update_norm,
)
from confide.server.job import AggregationConfig, JobConfig, JobFile


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


ALLOWED = "allowed: bulyan, fedavg, krum, median, multi-krum, trimmed-mean"


def test_the_registry_names_its_rules_and_refuses_an_unknown_one():
    assert set(RULES) == {"fedavg", "median", "trimmed-mean", "krum", "multi-krum", "bulyan"}
    assert isinstance(aggregation_rule("fedavg"), FedAvgRule)
    assert isinstance(aggregation_rule(AggregationConfig()), FedAvgRule)
    with pytest.raises(ValueError, match=f"unknown aggregation rule 'mean'; {ALLOWED}"):
        aggregation_rule("mean")


def test_each_rule_is_built_with_the_parameters_it_reads():
    def built(**settings: object) -> object:
        return aggregation_rule(AggregationConfig.model_validate(settings))

    trimmed = built(rule="trimmed-mean", trim_fraction=0.3, byzantine=4)
    assert isinstance(trimmed, TrimmedMeanRule) and trimmed.trim_fraction == 0.3
    krum = built(rule="krum", byzantine=2, keep=9)  # keep: multi-krum's only
    assert isinstance(krum, KrumRule) and (krum.byzantine, krum.keep) == (2, 1)
    multi = built(rule="multi-krum", byzantine=2, keep=9)
    assert isinstance(multi, MultiKrumRule) and (multi.byzantine, multi.keep) == (2, 9)
    bulyan = built(rule="bulyan", byzantine=3)
    assert isinstance(bulyan, BulyanRule) and bulyan.minimum_updates == 15
    assert isinstance(built(rule="median", trim_fraction=0.4), MedianRule)
    # A bare name: the defaults, the same as [aggregation]'s.
    defaults = AggregationConfig()
    assert (defaults.trim_fraction, defaults.byzantine, defaults.keep) == (0.1, 1, None)
    assert defaults.max_update_norm is None
    by_name = aggregation_rule("trimmed-mean")
    assert isinstance(by_name, TrimmedMeanRule) and by_name.trim_fraction == defaults.trim_fraction


def refusal(settings: dict[str, object]) -> str:
    with pytest.raises(ConfigFileError) as refused:
        validate_file(settings, JobFile, path=Path("job.toml"), what="job")
    return str(refused.value)


def test_a_job_file_with_an_unknown_rule_is_refused_with_the_allowed_names():
    assert JobConfig().aggregation.rule == "fedavg"
    message = refusal({"aggregation": {"rule": "mean"}})
    assert "aggregation.rule: Value error, unknown aggregation rule 'mean'" in message
    assert ALLOWED in message


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("trim_fraction", 0.5, "0.0 <= value < 0.5"),
        ("trim_fraction", -0.1, "0.0 <= value < 0.5"),
        ("byzantine", -1, "0 <= value"),
        ("keep", 0, "1 <= value"),
        ("max_update_norm", 0.0, "0.0 < value"),
    ],
)
def test_an_out_of_range_parameter_is_refused_by_its_name(field: str, value: object, allowed: str):
    message = refusal({"aggregation": {field: value}})
    assert f"aggregation.{field}:" in message and allowed in message


def test_a_job_whose_min_train_is_below_the_rules_minimum_is_refused_with_both_numbers():
    federation = {"min_train": 6, "min_available": 10}
    message = refusal({"aggregation": {"rule": "krum", "byzantine": 2}, "federation": federation})
    assert "federation.min_train (6) is below the 7 updates a round" in message
    assert "n >= 2f + 3 = 7 (f = aggregation.byzantine = 2)" in message
    message = refusal({"aggregation": {"rule": "bulyan"}, "federation": federation})
    assert "federation.min_train (6) is below the 7 updates" in message and "4f + 3" in message
    message = refusal({"aggregation": {"rule": "multi-krum", "keep": 8}, "federation": federation})
    assert "below the 8 updates" in message and "aggregation.keep = 8" in message
    enough = {"min_train": 7, "min_available": 10}
    job = JobConfig.model_validate({"aggregation": {"rule": "bulyan"}, "federation": enough})
    assert job.aggregation.rule == "bulyan"


def test_central_dp_accepts_every_rule_with_a_derived_sensitivity():
    federation = {"min_train": 7, "min_available": 7}
    for name in RULES:
        settings = {"rule": name}
        JobConfig.model_validate(
            {
                "aggregation": settings,
                "federation": federation,
                "central_privacy": {"enabled": True},
            }
        )
        assert aggregation_rule(name).sensitivity(7) is not None


def test_a_scenario_takes_the_aggregation_settings_and_refuses_bad_ones_like_any_field():
    from confide.simulations.scenario import load_scenario

    settings = {"rule": "trimmed-mean", "trim_fraction": 0.2, "max_update_norm": 5.0}
    scenario = load_scenario("digits-dp", {"aggregation": settings})
    assert scenario.job().aggregation == AggregationConfig.model_validate(settings)
    with pytest.raises(ScenarioError, match=f"unknown aggregation rule 'mean'; {ALLOWED}"):
        load_scenario("digits-dp", {"aggregation": {"rule": "mean"}})
    with pytest.raises(ScenarioError, match=r"federation.min_train \(2\) is below the 7"):
        load_scenario("digits-dp", {"aggregation": {"rule": "bulyan"}})


# -- The coordinator's bound on an update's norm ---------------------------------------------
def test_an_updates_norm_is_its_change_over_all_arrays_together():
    current = record(w=[1.0, 1.0], b=[2.0])
    # Listed in another order; the change is (3, 4, 0) wherever the arrays sit.
    assert update_norm(current, record(b=[2.0], w=[4.0, 5.0])) == 5.0
    assert update_norm(current, current) == 0.0


def test_an_update_over_the_norm_bound_is_refused_with_its_norm_and_the_others_count(
    federation, inside_a_run
):
    from confide.server.app import run
    from confide.server.history import JobHistory

    def train(aggregation: dict[str, object]) -> JobHistory:
        grid, source = federation(run_id=len(histories) + 1, state=f"state-{len(histories)}")
        job = JobConfig.model_validate(
            {
                "task": {"name": "digits"},
                "data": {"test_fraction": 0.2, "validation_fraction": 0.1},
                "train": {"batch_size": 64, "lr": 1.0},
                "privacy": {"noise_multiplier": 1.0},
                "federation": {
                    "rounds": 1,
                    "min_train": 3,
                    "min_available": 3,
                    "min_evaluate": 0,
                    "fraction_evaluate": 0.0,
                },
                "aggregation": aggregation,
            }
        )
        history = JobHistory()
        run(job, grid, history=history, test_set=source.split().test, name="norm", noise_seed=0)
        histories.append(history)
        return history

    histories: list[JobHistory] = []
    # Krum with f = 0 over 3 institutions, under a bound every update keeps: all count.
    kept = train({"rule": "krum", "byzantine": 0, "max_update_norm": 1e6})
    assert [r.trained for r in kept.rounds] == [3] and kept.rejected == []
    refused = train({"rule": "krum", "byzantine": 0, "max_update_norm": 1e-6})
    assert [r.trained for r in refused.rounds] == [0]
    rows = [r for r in refused.rejected if r["refused_by"] == "coordinator"]
    assert len(rows) == 3
    for row in rows:
        reason = str(row["reason"])
        assert reason.startswith("UpdateRejected: update norm ")
        norm = float(reason.split()[3])
        assert norm > 1e-6
        assert reason.endswith(f"{norm:.6g} exceeds aggregation.max_update_norm 1e-06")
