"""How a round's accepted updates become the next global model: aggregation rules by name.

A rule is one class and one entry in `RULES`; jobs and scenarios choose it, with the
parameters it reads, in `[aggregation]` (`confide.server.job.AggregationConfig`). With w_t the
global model, w_i the model institution i returns, d_i = w_i - w_t its change and n the
number of accepted updates (in institution order: the strategy sorts them):

    fedavg        w_{t+1} = sum_i n_i w_i / sum_i n_i    n_i: i's declared size (McMahan 2017)
    median        w_{t+1} = w_t + med_j(d_1j, ..., d_nj) for every coordinate j (Yin 2018)
    trimmed-mean  w_{t+1} = w_t + per coordinate, the mean of the d_ij without the k largest
                  and the k smallest, k = floor(beta n)                          (Yin 2018)
    krum          w_{t+1} = w_t + d_{i*}, i* the lowest Krum score      (Blanchard 2017)
    multi-krum    w_{t+1} = w_t + the mean of the m lowest-scored d_i   (Blanchard 2017)
    bulyan        w_{t+1} = w_t + Bulyan over Krum of the d_i           (El Mhamdi 2018)

Parameters (`[aggregation]`): `trim_fraction` beta (trimmed-mean), `byzantine` f, the number
of Byzantine institutions tolerated (krum, multi-krum, bulyan), `keep` m (multi-krum; n - f by
default); a rule ignores the others. Each rule states the fewest updates it is defined for
(`minimum_updates`): 1 for fedavg, median and trimmed-mean, 2f + 3 for krum and multi-krum
(and m for multi-krum), 4f + 3 for bulyan; the job's validation refuses a
`federation.min_train` below it, and the strategy does not aggregate a round with fewer.

fedavg is Flower's own `aggregate_arrayrecords`. The robust rules are unweighted, as in their
papers (a declared size would let one institution outweigh the others at will), and work on
the changes d_i in float64: median, trimmed mean and Bulyan's coordinate stage are
translation-equivariant and Krum's distances translation-invariant, so this is the rule on
the models, and it is the form central DP needs. Integer arrays (counters, not trained) keep
the current model's values under a robust rule, as under central DP.

A rule also says whether central DP may wrap it (`confide.server.central_dp`): the wrapper
clips every institution's change to L2 norm C, applies the rule to the clipped changes
(`central_sum`) and adds Gaussian noise: clip -> rule -> noise. The noise only protects an
institution if it is calibrated to how far one institution's clipped change can move what
is released (its L2 sensitivity); `sensitivity(asked)` states it, in units of C, for a round
that asked `asked` institutions: 1 for fedavg (a sum over a fixed divisor), 2B for a robust
rule whose output never has a norm above B C (`RobustRule`). None (the default) means nobody
has derived it, and central DP refuses the rule: a new rule derives its own, never copies
another's.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, Self

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.differential_privacy import get_norm
from numpy.typing import NDArray

# The weight of an update in a reply's metrics (Flower's key), also the key fedavg weights by.
WEIGHT_KEY = "num-examples"
# `[aggregation]`'s defaults for the rules' parameters (AggregationConfig reads them here).
DEFAULT_TRIM_FRACTION = 0.1
DEFAULT_BYZANTINE = 1

Arrays = list[NDArray[np.float64]]


class RuleSettings(Protocol):
    """A rule's parameters as `[aggregation]` gives them (`AggregationConfig`)."""

    @property
    def rule(self) -> str: ...

    @property
    def trim_fraction(self) -> float: ...

    @property
    def byzantine(self) -> int: ...

    @property
    def keep(self) -> int | None: ...


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


# -- Changes and their norm (the coordinator's norm bound, central DP's clipping) -----------
def float_arrays(record: ArrayRecord, names: Sequence[str]) -> Arrays:
    """`record`'s arrays named `names`, in that order, as float64."""
    return [np.asarray(record[name].numpy(), dtype=np.float64) for name in names]


def model_change(base: Arrays, update: ArrayRecord, names: Sequence[str]) -> Arrays:
    """d_i = w_i - w_t in float64, `base` being w_t's arrays named `names`. By name, not
    position: a reply may list its arrays in another order."""
    return [after - before for after, before in zip(float_arrays(update, names), base, strict=True)]


def change_norm(change: Arrays) -> float:
    """||d||_2 over all arrays together (Flower's `get_norm`, as its FlatClip uses it)."""
    return float(get_norm(change))


def update_norm(current: ArrayRecord, update: ArrayRecord) -> float:
    """||w_i - w_t||_2 over all of the global model's arrays together, in float64."""
    names = list(current.keys())
    return change_norm(model_change(float_arrays(current, names), update, names))


class AggregationRule(ABC):
    """A rule: the next global model from the accepted updates, and nothing else (no noise,
    no budget). Subclasses set `name` and implement `combine`; the parameters they read come
    through `from_settings`."""

    name: ClassVar[str]

    @classmethod
    def from_settings(cls, settings: RuleSettings) -> Self:
        """The rule with the parameters it reads from `settings` (here: none)."""
        return cls()

    @property
    def minimum_updates(self) -> int:
        """The fewest updates the rule is defined for."""
        return 1

    def minimum_reason(self) -> str:
        """`minimum_updates` as the rule's condition, naming the job's settings."""
        return "n >= 1"

    def sensitivity(self, asked: int) -> float | None:
        """L2 sensitivity of `central_sum`'s total to one institution's clipped change, in
        units of the clipping norm C, in a round that asked `asked` institutions (whether it
        is derived does not depend on `asked`). None: not derived; central DP refuses the
        rule."""
        return None

    @abstractmethod
    def combine(self, current: ArrayRecord, updates: Sequence[Update]) -> ArrayRecord:
        """The next global model from at least `minimum_updates` updates."""

    def central_sum(
        self, changes: Sequence[Arrays], *, like: Arrays, asked: int
    ) -> tuple[Arrays, int]:
        """Central DP's form of the rule: (total, divisor) of the clipped changes (float64,
        shaped `like` the model; a round may have none), released as
        w_t + (total + noise) / divisor. Only rules with a `sensitivity` have one."""
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

    def sensitivity(self, asked: int) -> float:
        return 1.0

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


class RobustRule(AggregationRule):
    """An unweighted statistic of the changes: w_{t+1} = w_t + stat(d_1, ..., d_n).

    Under central DP the statistic of the clipped changes is released with divisor 1:
    w_{t+1} = w_t + stat(clip(d_i, C)) + N(0, (sigma s C)^2 I), where a round with fewer than
    `minimum_updates` clipped changes (none included) releases a zero change plus the noise.

    Sensitivity, by a norm bound. Suppose every output has ||stat(S)|| <= B C whenever S holds
    at most `asked` vectors of norm <= C (a zero output included). Two neighbouring rounds
    (one institution's contribution removed, added or replaced; whoever else replies) give
    outputs u, v with ||u - v|| <= ||u|| + ||v|| <= 2 B C: s = 2B, with
    B = max_{minimum_updates <= n <= asked} B(n) (`norm_bound`). The bound does not look at
    the others' updates, so it holds under add/remove and replace-one alike. No tighter bound
    is claimed: one input can make a robust rule jump between very different outputs (Krum
    picks another update; a median moves from one middle value to another).

    The coordinate-wise rules' B(n) follow from one lemma. Let g_j be the rule's value at
    coordinate j of the n vectors x_1..x_n (norm <= C each). If, for a number c that depends
    only on the rule and n, every coordinate has sum_i x_ij^2 >= c g_j^2, then summing over j:
    ||g||^2 <= sum_j sum_i x_ij^2 / c = sum_i ||x_i||^2 / c <= n C^2 / c, so B(n) = sqrt(n/c).
    Each rule's c (shown for g_j >= 0; negate every value for g_j < 0) is in its docstring;
    the tests check the bounds on random and adversarial sets.
    """

    @abstractmethod
    def statistic(self, changes: Sequence[Arrays]) -> Arrays:
        """The rule's statistic of at least `minimum_updates` changes (float64 arrays, in the
        changes' order and shapes)."""

    @abstractmethod
    def norm_bound(self, n: int) -> float:
        """B(n): ||statistic(x_1..x_n)|| <= B(n) C for any n >= `minimum_updates` vectors of
        norm <= C."""

    def sensitivity(self, asked: int) -> float:
        low = self.minimum_updates
        # Below the minimum the release is zero (norm 0): the sizes that count start there.
        return 2.0 * max(self.norm_bound(n) for n in range(low, max(asked, low) + 1))

    def combine(self, current: ArrayRecord, updates: Sequence[Update]) -> ArrayRecord:
        if len(updates) < self.minimum_updates:
            raise ValueError(
                f"the {self.name} rule got {len(updates)} updates; it needs {self.minimum_reason()}"
            )
        names = list(current.keys())
        base = float_arrays(current, names)
        moved = self.statistic([model_change(base, update.arrays, names) for update in updates])
        arrays = {}
        for name, start, change in zip(names, base, moved, strict=True):
            dtype = current[name].numpy().dtype
            if not np.issubdtype(dtype, np.floating):
                arrays[name] = current[name]  # counters and the like: not trained, kept
                continue
            arrays[name] = Array(np.asarray(start + change).astype(dtype))
        return ArrayRecord(arrays)

    def central_sum(
        self, changes: Sequence[Arrays], *, like: Arrays, asked: int
    ) -> tuple[Arrays, int]:
        if len(changes) < self.minimum_updates:
            return [np.zeros_like(array) for array in like], 1
        return self.statistic(changes), 1


def _layers(changes: Sequence[Arrays]) -> list[NDArray[np.float64]]:
    """Per array of the model, the n institutions' values stacked on a new first axis."""
    return [np.stack(layer) for layer in zip(*changes, strict=True)]


class MedianRule(RobustRule):
    """Coordinate-wise median (Yin et al. 2018), NumPy's `median` as Flower's FedMedian uses
    it: the middle value for odd n, the mean of the two middle values for even n.

    Norm bound: the median is the trimmed mean that cuts k = floor((n - 1) / 2) values at
    each end (one value kept for odd n, the two middle ones for even n), so `TrimmedMeanRule`'s
    lemma gives c = n - k: B(n)^2 = n / (n - floor((n - 1) / 2)), that is 2n / (n + 1) for odd
    n and 2n / (n + 2) for even n, always below 2 (B < sqrt(2), s < 2 sqrt(2)). It is reached:
    with values a or 0 where, per coordinate, n - k of the n vectors hold a, spread evenly.
    """

    name = "median"

    def statistic(self, changes: Sequence[Arrays]) -> Arrays:
        return [np.asarray(np.median(layer, axis=0)) for layer in _layers(changes)]

    def norm_bound(self, n: int) -> float:
        return math.sqrt(n / (n - (n - 1) // 2))


class TrimmedMeanRule(RobustRule):
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, the mean of the n
    values without the k largest and the k smallest, k = floor(beta n) (`trim_fraction`,
    0 <= beta < 1/2, so that n - 2k >= 1 values are kept). Flower's `trim_mean` computes it
    (as SciPy's, k = int(beta * n) in floating point: beta = 0.29, n = 100 cuts 28).

    Norm bound. Let y_1 <= ... <= y_n be a coordinate's values and g the mean of the kept
    y_{k+1..n-k}; say g >= 0. By Jensen the kept values have sum y^2 >= (n - 2k) g^2, and each
    of the k values cut at the top is >= y_{n-k} >= g >= 0, so y^2 >= g^2: in all
    sum_i y_i^2 >= (n - k) g^2, c = n - k, B(n) = sqrt(n / (n - k)) <= 1 / sqrt(1 - beta).
    It is reached: values a or 0 where, per coordinate, n - k vectors hold a.
    """

    name = "trimmed-mean"

    def __init__(self, trim_fraction: float = DEFAULT_TRIM_FRACTION) -> None:
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    @classmethod
    def from_settings(cls, settings: RuleSettings) -> Self:
        return cls(trim_fraction=settings.trim_fraction)

    def statistic(self, changes: Sequence[Arrays]) -> Arrays:
        return [np.asarray(trim_mean(layer, self.trim_fraction)) for layer in _layers(changes)]

    def norm_bound(self, n: int) -> float:
        cut = int(self.trim_fraction * n)  # as trim_mean computes it
        return math.sqrt(n / (n - cut))


def squared_distances(changes: Sequence[Arrays]) -> NDArray[np.float64]:
    """The n x n matrix of ||d_i - d_j||^2 over all arrays together (zero diagonal).

    From the differences, not from ||a||^2 + ||b||^2 - 2 a.b as Flower's `compute_distances`
    does (in the arrays' own dtype, float32 for models): that expansion cancels badly when the
    vectors are long and close, and makes an update's distance to itself nonzero."""
    n = len(changes)
    distances = np.zeros((n, n))
    for layer in _layers(changes):
        flat = layer.reshape(n, -1)
        for i in range(n - 1):
            difference = flat[i + 1 :] - flat[i]
            distances[i, i + 1 :] += np.einsum("ij,ij->i", difference, difference)
    return distances + distances.T


def krum_scores(distances: NDArray[np.float64], byzantine: int) -> NDArray[np.float64]:
    """Krum's score (Blanchard et al. 2017) of each of n vectors, from their squared
    distances: s(i) = sum of ||d_i - d_j||^2 over the n - f - 2 vectors j != i closest to d_i
    (ties among distances do not change the sum).

    Krum is defined for n >= 2f + 3; Bulyan's recursion applies it down to 2f + 1 vectors,
    where n - f - 2 can fall below 1 (f = 1: 3 left). There the closest one counts, as in
    Flower's `select_multikrum`, rather than none (every score 0: the first institution left
    would be chosen, an outlier as well as anyone)."""
    n = len(distances)
    nearest = max(1, n - byzantine - 2)
    # Itself excluded by index: Flower's `select_multikrum` drops the first of the sorted row
    # instead, which is another update when two are equal or rounding puts one first.
    return np.array([np.sort(np.delete(distances[i], i))[:nearest].sum() for i in range(n)])


class MultiKrumRule(RobustRule):
    """Multi-Krum (Blanchard et al. 2017): the unweighted mean of the m updates with the
    lowest Krum scores (`krum_scores`), m = `keep`, n - f by default, f = `byzantine`; defined
    for n >= 2f + 3 (Krum's condition n > 2f + 2) and n >= m. Ties in score are broken by
    institution order (a stable sort), and the chosen ones are averaged in institution order.
    Ties are not rare: where one neighbour counts (n = f + 3), the two closest updates have
    the same score; the strategy's sorting of institutions keeps the choice reproducible.

    Why not Flower's `select_multikrum`: it computes the distances in the models' dtype by
    the expansion formula (see `squared_distances`), excludes an update's distance to itself
    by sort position, breaks ties with NumPy's default (unstable) sort, and Flower's MultiKrum
    then weights the mean by declared size, which the paper does not.

    Norm bound: the mean of m vectors of norm <= C has norm <= C (the triangle inequality),
    so B = 1, s = 2 whatever n.
    """

    name = "multi-krum"

    def __init__(self, byzantine: int = DEFAULT_BYZANTINE, keep: int | None = None) -> None:
        if byzantine < 0:
            raise ValueError(f"byzantine must be at least 0, got {byzantine}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.byzantine = byzantine
        self.keep = keep

    @classmethod
    def from_settings(cls, settings: RuleSettings) -> Self:
        return cls(byzantine=settings.byzantine, keep=settings.keep)

    @property
    def minimum_updates(self) -> int:
        return max(2 * self.byzantine + 3, self.keep or 0)

    def minimum_reason(self) -> str:
        f = self.byzantine
        if self.keep is not None and self.keep > 2 * f + 3:
            return f"n >= m = aggregation.keep = {self.keep} (and 2f + 3, f = {f})"
        return f"n >= 2f + 3 = {2 * f + 3} (f = aggregation.byzantine = {f})"

    def chosen(self, changes: Sequence[Arrays]) -> list[int]:
        """The indices of the m lowest-scored changes, in institution order."""
        keep = self.keep if self.keep is not None else len(changes) - self.byzantine
        scores = krum_scores(squared_distances(changes), self.byzantine)
        return sorted(np.argsort(scores, kind="stable")[:keep].tolist())

    def statistic(self, changes: Sequence[Arrays]) -> Arrays:
        chosen = self.chosen(changes)
        return [np.asarray(layer[chosen].mean(axis=0)) for layer in _layers(changes)]

    def norm_bound(self, n: int) -> float:
        return 1.0


class KrumRule(MultiKrumRule):
    """Krum (Blanchard et al. 2017): the update with the lowest Krum score (the first in
    institution order on a tie), Multi-Krum with m = 1; defined for n >= 2f + 3.

    Norm bound: the output is one of the clipped changes: B = 1, s = 2."""

    name = "krum"

    def __init__(self, byzantine: int = DEFAULT_BYZANTINE) -> None:
        super().__init__(byzantine=byzantine, keep=1)

    @classmethod
    def from_settings(cls, settings: RuleSettings) -> Self:
        return cls(byzantine=settings.byzantine)


def bulyan_selection(distances: NDArray[np.float64], byzantine: int, count: int) -> list[int]:
    """Bulyan's first stage (El Mhamdi et al. 2018) with Krum: `count` times, the lowest
    Krum score among the vectors not yet chosen, scored among those only (n - f - 2 nearest
    with n the number left, at least one; the first in institution order on a tie), joins the
    selection. For f <= 2 a step scores with one neighbour (f + 3 left), where the two
    closest tie: the selection then depends on institution order, not on reply order."""
    left = list(range(len(distances)))
    chosen: list[int] = []
    while len(chosen) < count:
        scores = krum_scores(distances[np.ix_(left, left)], byzantine)
        chosen.append(left.pop(int(np.argmin(scores))))  # argmin: the first lowest
    return sorted(chosen)


def closest_to_median_mean(layer: NDArray[np.float64], beta: int) -> NDArray[np.float64]:
    """Per coordinate, the mean of the `beta` values closest to the coordinate's median (NumPy's
    median; on a tie in distance, the first in institution order: a stable sort)."""
    distance = np.abs(layer - np.median(layer, axis=0))
    closest = np.argsort(distance, axis=0, kind="stable")[:beta]
    return np.asarray(np.take_along_axis(layer, closest, axis=0).mean(axis=0))


class BulyanRule(RobustRule):
    """Bulyan over Krum (El Mhamdi et al. 2018), defined for n >= 4f + 3 (f = `byzantine`):
    theta = n - 2f updates are selected by Krum applied again to those left after each choice
    (`bulyan_selection`); then per coordinate the mean of the beta = theta - 2f selected values
    closest to their median (`closest_to_median_mean`).

    Flower's Bulyan differs in its first stage: by default it selects with one pass of
    `select_multikrum` (the theta lowest scores among all n), not the paper's recursion; its
    second stage (`aggregate_n_closest_weights`) is the paper's, with ties left to
    `argpartition`. Here both stages follow the paper, ties in institution order.

    Norm bound, per coordinate j of the theta selected values y_1..y_theta (each selected
    vector has norm <= C, so sum over j and the selection of y^2 is <= theta C^2), median m,
    W the beta values closest to m, g their mean; say g >= 0, and let D = max_W |y - m|.
    (1) Jensen over W: sum_i y_i^2 >= beta g^2.
    (2) If D = 0, W's values all equal m, so g = m >= 0, and at least ceil(theta/2) values
        are >= m (the median is the middle value, or the mean of the two middle ones, so at
        most floor(theta/2) values lie below it): their squares are >= g^2.
    (3) If D > 0, every value outside W is at distance >= D from m (W holds the closest), so
        it is >= m + D or <= m - D. Those <= m - D lie below m: at most floor(theta/2) of them.
        So W and the values >= m + D together number >= ceil(theta/2), and each value
        >= m + D is >= max W >= g >= 0, its square >= g^2; with (1) over W:
        sum_i y_i^2 >= ceil(theta/2) g^2.
    Hence c = max(beta, ceil(theta/2)) and B(n)^2 = theta / max(theta - 2f, ceil(theta/2)),
    at most 2 (Jensen alone, theta / beta, grows with f at n = 4f + 3: (2f + 3) / 3).
    """

    name = "bulyan"

    def __init__(self, byzantine: int = DEFAULT_BYZANTINE) -> None:
        if byzantine < 0:
            raise ValueError(f"byzantine must be at least 0, got {byzantine}")
        self.byzantine = byzantine

    @classmethod
    def from_settings(cls, settings: RuleSettings) -> Self:
        return cls(byzantine=settings.byzantine)

    @property
    def minimum_updates(self) -> int:
        return 4 * self.byzantine + 3

    def minimum_reason(self) -> str:
        f = self.byzantine
        return f"n >= 4f + 3 = {4 * f + 3} (f = aggregation.byzantine = {f})"

    def statistic(self, changes: Sequence[Arrays]) -> Arrays:
        selected = len(changes) - 2 * self.byzantine
        chosen = bulyan_selection(squared_distances(changes), self.byzantine, selected)
        beta = selected - 2 * self.byzantine
        return [closest_to_median_mean(layer[chosen], beta) for layer in _layers(changes)]

    def norm_bound(self, n: int) -> float:
        selected = n - 2 * self.byzantine
        kept = max(selected - 2 * self.byzantine, -(-selected // 2))
        return math.sqrt(selected / kept)


# Every rule a job may name: adding one is a class above and a line here.
RULES: dict[str, type[AggregationRule]] = {
    rule.name: rule
    for rule in (FedAvgRule, MedianRule, TrimmedMeanRule, KrumRule, MultiKrumRule, BulyanRule)
}


def rule_names() -> str:
    return ", ".join(sorted(RULES))


def aggregation_rule(settings: RuleSettings | str) -> AggregationRule:
    """The rule `settings` names, with the parameters it reads from them (a bare name: the
    rule with its default parameters); ValueError naming the allowed rules otherwise."""
    name = settings if isinstance(settings, str) else settings.rule
    if name not in RULES:
        raise ValueError(f"unknown aggregation rule {name!r}; allowed: {rule_names()}")
    if isinstance(settings, str):
        return RULES[name]()
    return RULES[name].from_settings(settings)
