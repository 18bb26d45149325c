"""The coordinator's strategy, composed of parts as Flower's own strategies compose:

- `Roster` (confide.server.sampling): who the institutions are (the coordinator's records in
  deployment, the nodes' answers in simulation) and which of them each round asks, sampled
  reproducibly from the job's seed;
- `Replies` (confide.server.replies): which replies count (`check_update`, the job's
  `max_update_norm`), the refusals (`FINAL_REFUSALS` take an institution off the roster),
  the institutions asked that never answered, and each institution's privacy spend,
  recorded even when its update is refused;
- an `Aggregation` (confide.server.aggregation): the job's `[aggregation]` rule (fedavg,
  median, trimmed-mean, krum, multi-krum, bulyan), or `CentralDP`
  (confide.server.central_dp) wrapping that rule.

`ConfideStrategy` only wires them into Flower's four calls. What a round produced leaves in
the records it returns (confide.server.rounds), not in attributes of the strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.typing import MetricRecordValues
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from confide.common.errors import JobStopped
from confide.server.aggregation import WEIGHT_KEY, Aggregation, aggregation_rule
from confide.server.central_dp import CentralDP
from confide.server.history import JobHistory
from confide.server.job import FederationConfig, JobConfig
from confide.server.replies import Replies, Scored
from confide.server.rounds import below_minimum, train_metrics
from confide.server.sampling import Roster


@dataclass(frozen=True)
class _Asked:
    """A round between its train messages and their replies: the model they carried and the
    messages (their ids, once pushed, say whom each reply answers; how many institutions
    were asked is what central DP divides by)."""

    arrays: ArrayRecord
    messages: list[Message]

    @property
    def institutions(self) -> int:
        return len(self.messages)


class ConfideStrategy(Strategy):
    """Sample with `roster`, validate and book with `replies`, combine with `aggregation`."""

    def __init__(
        self,
        federation: FederationConfig,
        *,
        roster: Roster,
        replies: Replies,
        aggregation: Aggregation,
    ) -> None:
        self.federation = federation
        self.roster = roster
        self.replies = replies
        self.aggregation = aggregation
        self._asked: _Asked | None = None
        self._evaluating: list[Message] = []

    @classmethod
    def for_job(
        cls,
        job: JobConfig,
        history: JobHistory,
        *,
        noise_seed: int | None = None,
        registered: Callable[[], dict[int, str]] | None = None,
    ) -> ConfideStrategy:
        """The strategy of `job`: its rule, wrapped in central DP when the job asks for it
        (`noise_seed`: see CentralDP); `registered`: see Roster."""
        roster = Roster(job.federation, job.seed, history, registered=registered)
        rule = aggregation_rule(job.aggregation)
        aggregation: Aggregation = rule
        if job.central_privacy.enabled:
            aggregation = CentralDP(job.central_privacy, rule, noise_seed)
        return cls(
            job.federation,
            roster=roster,
            replies=Replies(history, roster, max_update_norm=job.aggregation.max_update_norm),
            aggregation=aggregation,
        )

    def summary(self) -> None:
        federation = self.federation
        fractions = (federation.fraction_train, federation.fraction_evaluate)
        log(INFO, "\t├──> Sampling: fraction train (%.2f) | evaluate (%.2f)", *fractions)
        log(INFO, "\t└──> Aggregation: %s", type(self.aggregation).__name__)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self.roster.sample(grid, server_round, "train")
        if reason := self.aggregation.refusal(len(nodes)):
            raise JobStopped(f"stopped before round {server_round}: {reason}")
        messages = _messages(
            nodes, arrays, config, message_type=MessageType.TRAIN, server_round=server_round
        )
        self._asked = _Asked(arrays, messages)
        log(INFO, "round %d: training on %d institutions", server_round, len(nodes))
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._evaluating = []
        if self.federation.fraction_evaluate == 0.0:
            return []
        nodes = self.roster.sample(grid, server_round, "evaluate")
        self._evaluating = _messages(
            nodes, arrays, config, message_type=MessageType.EVALUATE, server_round=server_round
        )
        return self._evaluating

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The next model from the usable updates (institution order) by the aggregation,
        and the round's train record (confide.server.rounds.train_metrics).

        A round with fewer usable updates than `federation.min_train` is not aggregated (the
        global model stays as it is; the record says why), except under central DP: there
        every round is released, with noise, whoever replied, since whether a round is
        released must not depend on the replies (see confide.server.central_dp)."""
        if self._asked is None:
            raise RuntimeError("aggregate_train before configure_train")
        asked = self._asked
        updates, epsilons = self.replies.train(
            server_round, replies, asked.arrays, asked=asked.messages
        )
        minimum = self.federation.min_train
        short = len(updates) < minimum
        if short and not isinstance(self.aggregation, CentralDP):
            log(
                WARNING,
                "round %d: %d usable update(s), federation.min_train is %d; the global model "
                "is unchanged",
                server_round,
                len(updates),
                minimum,
            )
            return None, below_minimum(len(updates), minimum)
        arrays = self.aggregation.aggregate(
            asked.arrays, updates, asked=asked.institutions, server_round=server_round
        )
        if arrays is None:
            log(WARNING, "round %d: no valid update; the global model is unchanged", server_round)
            return None, None
        metrics = train_metrics(
            updates,
            epsilons,
            epsilon_max=self.replies.history.epsilon_max,
            aggregation=self.aggregation.round_metrics(),
            minimum=minimum if short else None,
        )
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the institutions' validation metrics."""
        scored = self.replies.evaluate(server_round, replies, asked=self._evaluating)
        return weighted_metrics(scored)


def weighted_metrics(scored: Iterable[Scored]) -> MetricRecord | None:
    """sum_i n_i m_i / sum_i n_i for every metric m, over institutions with n_i > 0
    validation examples, and the total as `num-examples` (None: no examples at all)."""
    totals: dict[str, float] = {}
    weight = 0
    for entry in scored:
        if entry.examples <= 0:
            continue
        weight += entry.examples
        for key, value in entry.metrics.items():
            totals[key] = totals.get(key, 0.0) + entry.examples * value
    if weight == 0:
        return None
    means: dict[str, MetricRecordValues] = {key: value / weight for key, value in totals.items()}
    return MetricRecord(means | {WEIGHT_KEY: weight})


def _messages(
    nodes: list[int],
    arrays: ArrayRecord,
    config: ConfigRecord,
    *,
    message_type: str,
    server_round: int,
) -> list[Message]:
    """One message per node carrying the model and the round's instructions."""
    config["server-round"] = server_round
    record = RecordDict({"arrays": arrays, "config": config})
    return [Message(content=record, message_type=message_type, dst_node_id=node) for node in nodes]
