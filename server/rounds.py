"""A round's record travels in what the strategy returns, as Flower's strategies report.

`aggregate_train` returns a MetricRecord (`train_metrics`): the institutions whose update
counted and their declared examples, the largest cumulative epsilon, each of those
institutions' cumulative epsilon (`epsilon/<institution>`) and what the aggregation reports
of the round (central DP: its epsilon so far and how many institutions the release divided
by). `aggregate_evaluate` returns the example-weighted mean of the institutions' validation
metrics with their total `num-examples`. The ServerApp reads a round's `RoundRecord` back
from those records (`RoundRecorder`), never from the strategy's state.

Flower's `Strategy.start` collects the same records in a `Result`, but returns it only at the
end of the job, and not at all when the job stops early (JobStopped); `RoundRecorder` wraps
the strategy and fills a `Result` as each round's records come back, so that the round's
central evaluation can record the round at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.app.typing import MetricRecordValues
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from confide.server.aggregation import WEIGHT_KEY, Update
from confide.server.central_dp import CENTRAL_ASKED, CENTRAL_EPSILON
from confide.server.history import RoundRecord

INSTITUTIONS = "institutions"
EPSILON_MAX = "epsilon-max"
EPSILON_OF = "epsilon/"  # + institution: its cumulative epsilon after the round


def train_metrics(
    updates: Sequence[Update],
    epsilons: Mapping[str, float],
    *,
    epsilon_max: float,
    aggregation: Mapping[str, int | float],
) -> MetricRecord:
    """The train MetricRecord of a round whose `updates` counted (`epsilons`: of their
    institutions, in institution order), with the aggregation's own figures."""
    if not updates:
        return MetricRecord({INSTITUTIONS: 0, WEIGHT_KEY: 0, **aggregation})
    examples = sum(int(update.weight) for update in updates)
    return MetricRecord(
        {
            INSTITUTIONS: len(updates),
            WEIGHT_KEY: examples,
            EPSILON_MAX: epsilon_max,
            **{EPSILON_OF + name: value for name, value in epsilons.items()},
            **aggregation,
        }
    )


def round_record(
    server_round: int,
    metrics: dict[str, float],
    *,
    train: MetricRecord | None,
    evaluate: MetricRecord | None,
    epsilon_max: float,
    seconds: float,
) -> RoundRecord:
    """The round's record from its central `metrics` and the records the strategy returned
    (None: it returned none, e.g. no usable update without central DP)."""
    trained, epsilons, central = 0, {}, None
    if train is not None:
        trained = int(_scalar(train[INSTITUTIONS]))
        epsilons = {
            key.removeprefix(EPSILON_OF): float(_scalar(value))
            for key, value in train.items()
            if key.startswith(EPSILON_OF)
        }
        if CENTRAL_EPSILON in train:
            central = float(_scalar(train[CENTRAL_EPSILON]))
    federated = {}
    if evaluate is not None:
        federated = {
            key: float(_scalar(value)) for key, value in evaluate.items() if key != WEIGHT_KEY
        }
    return RoundRecord(
        round=server_round,
        metrics=metrics,
        epsilon_max=epsilon_max,
        seconds=seconds,
        trained=trained,
        federated_metrics=federated,
        epsilons=epsilons,
        central_epsilon=central,
    )


def central_asked(train: MetricRecord | None) -> int | None:
    """How many institutions a central DP release divided by (None: no release)."""
    if train is None or CENTRAL_ASKED not in train:
        return None
    return int(_scalar(train[CENTRAL_ASKED]))


def _scalar(value: MetricRecordValues) -> int | float:
    """A number the strategy wrote (never a list: see `train_metrics`)."""
    if isinstance(value, list):
        raise TypeError("a round record holds numbers, not lists")
    return value


class RoundRecorder(Strategy):
    """Runs `strategy` unchanged and keeps what it returns, round by round, in `result` (a
    Flower `Result`), with the time each round started."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.result = Result()
        self.started: dict[int, float] = {}

    def summary(self) -> None:
        log(INFO, "\t├──> Records the rounds of %s", type(self.strategy).__name__)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.started[server_round] = time.perf_counter()
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.result.arrays = arrays
        if metrics is not None:
            self.result.train_metrics_clientapp[server_round] = metrics
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.result.evaluate_metrics_clientapp[server_round] = metrics
        return metrics

    def record(
        self, server_round: int, metrics: dict[str, float], *, epsilon_max: float
    ) -> RoundRecord:
        """Round `server_round`'s record, from its returned records, once centrally
        evaluated (`metrics`); its seconds run from its configure_train to now."""
        return round_record(
            server_round,
            metrics,
            train=self.result.train_metrics_clientapp.get(server_round),
            evaluate=self.result.evaluate_metrics_clientapp.get(server_round),
            epsilon_max=epsilon_max,
            seconds=time.perf_counter() - self.started[server_round],
        )
