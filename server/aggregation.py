"""How a round's accepted updates become the next global model: aggregation rules by name.

A rule is one class and one entry in `RULES`; jobs and scenarios choose it with
`[aggregation] rule = "<name>"` (`confide.server.job.AggregationConfig`). Today's rule:

    fedavg   w_{t+1} = sum_i n_i w_i / sum_i n_i    (n_i: institution i's declared size)

Flower's own `aggregate_arrayrecords` computes it, over the updates in institution order (the
strategy sorts them), so the floating-point sum is the same on every run.

A rule also says whether central DP may wrap it (`confide.server.central_dp`): the wrapper
clips every institution's change to L2 norm C and releases the rule's statistic of the
clipped changes with Gaussian noise, which only protects an institution if the noise is
calibrated to how far one institution's clipped change can move that statistic (its L2
sensitivity). `central_sensitivity` states it, in units of C, for the rule's `central_sum`
form; None (the default) means nobody has derived it, and central DP refuses the rule. A new
rule that should run under central DP must derive its own (a median or a trimmed mean is not
a sum with sensitivity C: one institution can move it by more, or the bound depends on the
others' updates) — never copy fedavg's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from numpy.typing import NDArray

# The weight of an update in a reply's metrics (Flower's key), also the key fedavg weights by.
WEIGHT_KEY = "num-examples"

Arrays = list[NDArray[np.float64]]


@dataclass(frozen=True)
class Update:
    """One institution's accepted model (`arrays`) and its declared size (`weight`, the
    reply's num-examples as sent)."""

    institution: str
    arrays: ArrayRecord
    weight: float


class Aggregation(Protocol):
    """What the strategy asks of a rule, or of a wrapper around one (central DP)."""

    def refusal(self, asked: int) -> str | None:
        """Why a round asking `asked` institutions must not run, or None."""
        ...

    def aggregate(
        self, current: ArrayRecord, updates: Sequence[Update], *, asked: int, server_round: int
    ) -> ArrayRecord | None:
        """The next global model (None: unchanged) from the updates of a round that asked
        `asked` institutions (`updates`, in institution order, may be fewer)."""
        ...

    def round_metrics(self) -> dict[str, int | float]:
        """Figures of the round just aggregated, added to the round's train MetricRecord."""
        ...


class AggregationRule(ABC):
    """A rule: the next global model from the accepted updates, and nothing else (no noise,
    no budget). Subclasses set `name` and implement `combine`."""

    name: ClassVar[str]
    # L2 sensitivity of `central_sum`'s total to one institution's clipped change, in units
    # of the clipping norm (None: not derived; central DP refuses the rule).
    central_sensitivity: ClassVar[float | None] = None

    @abstractmethod
    def combine(self, current: ArrayRecord, updates: Sequence[Update]) -> ArrayRecord:
        """The next global model from at least one update."""

    def central_sum(
        self, changes: Sequence[Arrays], *, like: Arrays, asked: int
    ) -> tuple[Arrays, int]:
        """Central DP's form of the rule: (total, divisor) of the clipped changes (float64,
        shaped `like` the model; a round may have none), released as
        w_t + (total + noise) / divisor. Only rules with a `central_sensitivity` have one."""
        raise NotImplementedError(f"the {self.name} rule has no central DP form")

    # -- Aggregation, for a rule used alone -------------------------------------------------
    def refusal(self, asked: int) -> str | None:
        return None

    def aggregate(
        self, current: ArrayRecord, updates: Sequence[Update], *, asked: int, server_round: int
    ) -> ArrayRecord | None:
        """`combine`; None (the model stays as it is) without any update."""
        return self.combine(current, updates) if updates else None

    def round_metrics(self) -> dict[str, int | float]:
        return {}


class FedAvgRule(AggregationRule):
    """Example-weighted mean of the models (McMahan et al. 2017), Flower's own arithmetic.

    Under central DP: the unweighted sum of clipped changes over a fixed divisor, the number
    of institutions asked. One institution's clipped change (norm <= C), replaced by nothing,
    moves the sum by at most C: sensitivity 1 (in units of C), whoever else replies. Weights
    are dropped there on purpose: a weight would let one institution move the mean by more
    than C / n_t; dividing by the number of replies instead would leak who replied into the
    scale and raise the sensitivity.
    """

    name = "fedavg"
    central_sensitivity = 1.0

    def combine(self, current: ArrayRecord, updates: Sequence[Update]) -> ArrayRecord:
        records = [
            RecordDict(
                {"arrays": update.arrays, "metrics": MetricRecord({WEIGHT_KEY: update.weight})}
            )
            for update in updates
        ]
        return aggregate_arrayrecords(records, WEIGHT_KEY)

    def central_sum(
        self, changes: Sequence[Arrays], *, like: Arrays, asked: int
    ) -> tuple[Arrays, int]:
        total = [np.zeros_like(array) for array in like]
        for change in changes:
            for index, array in enumerate(change):
                total[index] += array
        return total, asked


# Every rule a job may name: adding one is a class above and a line here.
RULES: dict[str, type[AggregationRule]] = {FedAvgRule.name: FedAvgRule}


def rule_names() -> str:
    return ", ".join(sorted(RULES))


def aggregation_rule(name: str) -> AggregationRule:
    """The rule registered as `name` (ValueError naming the allowed ones otherwise)."""
    if name not in RULES:
        raise ValueError(f"unknown aggregation rule {name!r}; allowed: {rule_names()}")
    return RULES[name]()
