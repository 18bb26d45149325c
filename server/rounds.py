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

Flower's `Strategy.start` always counts rounds from 1. A job resumed after its round k runs
the remaining rounds through `start` with `RoundRecorder(strategy, offset=k)`: the wrapped
strategy, the messages (`server-round`) and the records see the job's own round numbers
k+1..N, while Flower's log counts 1..N-k.
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
# A round with fewer usable updates than federation.min_train: how many it had, and the
# minimum (see ConfideStrategy.aggregate_train).
USABLE = "usable-updates"
MIN_TRAIN = "min-train"
EPSILON_MAX = "epsilon-max"
EPSILON_OF = "epsilon/"  # + institution: its cumulative epsilon after the round


def train_metrics(
    updates: Sequence[Update],
    epsilons: Mapping[str, float],
    *,
    epsilon_max: float,
    aggregation: Mapping[str, int | float],
    minimum: int | None = None,
) -> MetricRecord:
    """The train MetricRecord of a round whose `updates` counted (`epsilons`: of their
    institutions, in institution order), with the aggregation's own figures; `minimum`:
    federation.min_train when the round was released with fewer updates (central DP)."""
    short: dict[str, int] = {}
    if minimum is not None:
        short = {USABLE: len(updates), MIN_TRAIN: minimum}
    if not updates:
        return MetricRecord({INSTITUTIONS: 0, WEIGHT_KEY: 0, **aggregation, **short})
    examples = sum(int(update.weight) for update in updates)
    return MetricRecord(
        {
            INSTITUTIONS: len(updates),
            WEIGHT_KEY: examples,
            EPSILON_MAX: epsilon_max,
            **{EPSILON_OF + name: value for name, value in epsilons.items()},
            **aggregation,
            **short,
        }
    )


def below_minimum(usable: int, minimum: int) -> MetricRecord:
    """The train MetricRecord of a round not aggregated: `usable` updates, fewer than
    `minimum` (federation.min_train)."""
    return MetricRecord({INSTITUTIONS: 0, WEIGHT_KEY: 0, USABLE: usable, MIN_TRAIN: minimum})


def _note(train: MetricRecord) -> str | None:
    """Why a round's release is not an ordinary one (None: it is)."""
    if MIN_TRAIN not in train:
        return None
    usable, minimum = int(_scalar(train[USABLE])), int(_scalar(train[MIN_TRAIN]))
    if CENTRAL_EPSILON in train:
        return (
            f"released with {usable} usable update(s), fewer than federation.min_train "
            f"{minimum}: under central DP every round is released with its noise"
        )
    return (
        f"not aggregated: {usable} usable update(s), fewer than federation.min_train "
        f"{minimum}; the global model is unchanged"
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
    trained, epsilons, central, note = 0, {}, None, None
    if train is not None:
        note = _note(train)
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
        note=note,
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
    Flower `Result`), with the time each round started; Flower's round r is the job's round
    r + `offset` (a resumed job's last completed round) everywhere past this wrapper."""

    def __init__(self, strategy: Strategy, *, offset: int = 0) -> None:
        self.strategy = strategy
        self.offset = offset
        self.result = Result()
        self.started: dict[int, float] = {}

    def summary(self) -> None:
        log(INFO, "\t├──> Records the rounds of %s", type(self.strategy).__name__)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.offset
        self.started[server_round] = time.perf_counter()
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.offset
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.result.arrays = arrays
        if metrics is not None:
            self.result.train_metrics_clientapp[server_round] = metrics
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.offset
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round += self.offset
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.result.evaluate_metrics_clientapp[server_round] = metrics
        return metrics

    def record(
        self, server_round: int, metrics: dict[str, float], *, epsilon_max: float
    ) -> RoundRecord:
        """The job's round `server_round`'s record, from its returned records, once centrally
        evaluated (`metrics`); its seconds run from its configure_train to now."""
        return round_record(
            server_round,
            metrics,
            train=self.result.train_metrics_clientapp.get(server_round),
            evaluate=self.result.evaluate_metrics_clientapp.get(server_round),
            epsilon_max=epsilon_max,
            seconds=time.perf_counter() - self.started[server_round],
        )
