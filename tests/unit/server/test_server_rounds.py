"""A round's record is read from the records the strategy returns, not from its state."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from confide.server.aggregation import Update
from confide.server.replies import Scored
from confide.server.rounds import RoundRecorder, central_asked, round_record, train_metrics
from confide.server.strategy import weighted_metrics

MODEL = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
CENTRAL = {"central-epsilon": 1.25, "central-asked": 3}


def updates(*weights: int) -> list[Update]:
    return [Update(f"hospital-{k}", MODEL, weight) for k, weight in enumerate(weights)]


def test_a_round_record_is_read_back_from_the_train_and_evaluate_records():
    train = train_metrics(
        updates(100, 50),
        {"hospital-0": 2.5, "hospital-1": 3.0},
        epsilon_max=3.0,
        aggregation=CENTRAL,
    )
    assert train["institutions"] == 2 and train["num-examples"] == 150
    evaluate = MetricRecord({"accuracy": 0.75, "loss": 0.5, "num-examples": 40})
    record = round_record(
        4, {"accuracy": 0.8}, train=train, evaluate=evaluate, epsilon_max=3.0, seconds=1.5
    )
    assert (record.round, record.metrics, record.epsilon_max, record.seconds) == (
        4,
        {"accuracy": 0.8},
        3.0,
        1.5,
    )
    assert record.trained == 2
    assert list(record.epsilons.items()) == [("hospital-0", 2.5), ("hospital-1", 3.0)]
    assert record.federated_metrics == {"accuracy": 0.75, "loss": 0.5}
    assert record.central_epsilon == 1.25 and central_asked(train) == 3


def test_a_round_without_records_trained_nobody_and_has_no_central_epsilon():
    record = round_record(
        1, {"accuracy": 0.1}, train=None, evaluate=None, epsilon_max=0.0, seconds=0
    )
    assert (record.trained, record.epsilons, record.federated_metrics) == (0, {}, {})
    assert record.central_epsilon is None and central_asked(None) is None
    # Central DP releases a round in which no update counted: its record says so.
    empty = train_metrics([], {}, epsilon_max=0.0, aggregation=CENTRAL)
    nobody = round_record(1, {}, train=empty, evaluate=None, epsilon_max=0.0, seconds=0)
    assert (nobody.trained, nobody.epsilons, nobody.central_epsilon) == (0, {}, 1.25)


def test_federated_metrics_are_the_example_weighted_mean_of_those_with_examples():
    scored = [
        Scored("a", {"accuracy": 0.5, "loss": 1.0}, 10),
        Scored("b", {"accuracy": 1.0, "loss": 4.0}, 30),
        Scored("c", {"accuracy": 0.0, "loss": 99.0}, 0),  # no validation data: no say
    ]
    metrics = weighted_metrics(scored)
    assert metrics is not None
    # By hand: accuracy (10 * 0.5 + 30 * 1.0) / 40 = 0.875, loss (10 + 120) / 40 = 3.25.
    assert dict(metrics) == {"accuracy": 0.875, "loss": 3.25, "num-examples": 40}
    assert weighted_metrics([Scored("c", {"accuracy": 1.0}, 0)]) is None


class Scripted(Strategy):
    """Returns fixed records: round 1 a model and train metrics, round 2 nothing."""

    def summary(self) -> None:
        pass

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if server_round == 2:
            return None, None
        metrics = train_metrics(updates(7), {"hospital-0": 0.5}, epsilon_max=0.5, aggregation={})
        return MODEL, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return MetricRecord({"accuracy": 0.25 * server_round, "num-examples": 5})


def test_the_recorder_keeps_what_each_round_returned_and_records_from_it():
    recorder = RoundRecorder(Scripted())
    for server_round in (1, 2):
        recorder.configure_train(server_round, MODEL, ConfigRecord(), None)  # type: ignore[arg-type]
        recorder.aggregate_train(server_round, [])
        recorder.aggregate_evaluate(server_round, [])
    first = recorder.record(1, {"accuracy": 0.9}, epsilon_max=0.5)
    second = recorder.record(2, {"accuracy": 0.95}, epsilon_max=0.5)
    assert (first.trained, first.epsilons, first.federated_metrics) == (
        1,
        {"hospital-0": 0.5},
        {"accuracy": 0.25},
    )
    assert (second.trained, second.epsilons, second.federated_metrics) == (
        0,
        {},
        {"accuracy": 0.5},
    )
    assert list(recorder.result.train_metrics_clientapp) == [1]
    assert recorder.result.arrays is MODEL
    assert first.seconds >= 0 and second.seconds >= 0
    with pytest.raises(KeyError):  # a round that never started has no record
        recorder.record(3, {}, epsilon_max=0.0)
