"""The robust aggregation rules against their papers' definitions on small arrays, and their
central DP sensitivity against random and adversarial sets of clipped changes.

The reference functions below follow the papers word by word on plain lists (one flat vector
per institution); the rules work per array of the model, so each update here is two arrays."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from confide.server.aggregation import (
    Arrays,
    BulyanRule,
    FedAvgRule,
    KrumRule,
    MedianRule,
    MultiKrumRule,
    RobustRule,
    TrimmedMeanRule,
    Update,
    bulyan_selection,
    squared_distances,
)

Vector = list[float]
SHAPES = ((2,), (3,))  # two arrays per update: 5 coordinates


def as_arrays(vector: Sequence[float]) -> Arrays:
    flat = np.asarray(vector, dtype=np.float64)
    return [flat[:2].copy(), flat[2:].copy()]


def flat(arrays: Arrays) -> np.ndarray:
    return np.concatenate([np.ravel(array) for array in arrays])


def statistic(rule: RobustRule, vectors: Sequence[Sequence[float]]) -> np.ndarray:
    return flat(rule.statistic([as_arrays(vector) for vector in vectors]))


def random_vectors(rng: np.random.Generator, n: int, dim: int = 5) -> list[Vector]:
    return rng.normal(0.0, 1.0, (n, dim)).tolist()


def describe(rule: RobustRule) -> str:
    """A test id: the rule and its parameters."""
    parameters = {k: v for k, v in vars(rule).items() if v is not None}
    return rule.name + "".join(f"-{k}={v}" for k, v in parameters.items())


# -- The papers' definitions, on lists ------------------------------------------------------
def median_of(values: Sequence[float]) -> float:
    """The middle value, or the mean of the two middle values."""
    ordered, n = sorted(values), len(values)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def coordinate_median(vectors: Sequence[Vector]) -> Vector:
    return [median_of(column) for column in zip(*vectors, strict=True)]


def coordinate_trimmed_mean(vectors: Sequence[Vector], beta: float) -> Vector:
    """Yin et al. 2018: per coordinate, drop the k largest and k smallest, k = floor(beta n)."""
    k = int(beta * len(vectors))
    return [
        float(np.mean(sorted(column)[k : len(vectors) - k]))
        for column in zip(*vectors, strict=True)
    ]


def distance2(a: Vector, b: Vector) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True))


def krum_score(vectors: Sequence[Vector], i: int, f: int) -> float:
    """Blanchard et al. 2017: s(i) = sum of ||V_i - V_j||^2 over the n - f - 2 closest j != i
    (at least the closest one: Bulyan's last steps score fewer than 2f + 3 vectors)."""
    others = sorted(distance2(vectors[i], v) for j, v in enumerate(vectors) if j != i)
    return sum(others[: max(1, len(vectors) - f - 2)])


def krum_index(vectors: Sequence[Vector], f: int) -> int:
    scores = [krum_score(vectors, i, f) for i in range(len(vectors))]
    return scores.index(min(scores))  # the first lowest


def multi_krum(vectors: Sequence[Vector], f: int, m: int) -> Vector:
    """The mean of the m vectors with the best scores (ties: the earlier institution)."""
    scores = [krum_score(vectors, i, f) for i in range(len(vectors))]
    best = sorted(range(len(vectors)), key=lambda i: (scores[i], i))[:m]
    return [float(np.mean(column)) for column in zip(*(vectors[i] for i in best), strict=True)]


def bulyan_selected(vectors: Sequence[Vector], f: int) -> list[int]:
    """El Mhamdi et al. 2018, step 1: Krum on the vectors left, theta = n - 2f times."""
    left, chosen = list(range(len(vectors))), list[int]()
    while len(chosen) < len(vectors) - 2 * f:
        pick = left[krum_index([vectors[i] for i in left], f)]
        left.remove(pick)
        chosen.append(pick)
    return sorted(chosen)


def bulyan(vectors: Sequence[Vector], f: int) -> Vector:
    """Step 2: per coordinate, the mean of the beta = theta - 2f selected values closest to
    their median."""
    selected = [vectors[i] for i in bulyan_selected(vectors, f)]
    beta = len(selected) - 2 * f
    result = []
    for column in zip(*selected, strict=True):
        middle = median_of(column)
        closest = sorted(range(len(column)), key=lambda i: (abs(column[i] - middle), i))[:beta]
        result.append(float(np.mean([column[i] for i in closest])))
    return result


# -- Each rule against its definition -------------------------------------------------------
def test_the_median_is_the_middle_value_or_the_mean_of_the_two_middle_ones():
    odd = [[1, 9, 0, 0, 0], [5, -2, 0, 0, 0], [3, 4, 0, 0, 7]]
    assert statistic(MedianRule(), odd).tolist() == [3, 4, 0, 0, 0]
    even = [[1, 9, 0, 0, 0], [5, -2, 0, 0, 0], [3, 4, 0, 0, 7], [100, 4, 1, 0, 8]]
    assert statistic(MedianRule(), even).tolist() == [4, 4, 0, 0, 3.5]


def test_the_trimmed_mean_cuts_floor_beta_n_values_at_each_end():
    vectors = [[100, 1, 0, 0, 0], [1, 2, 0, 0, 0], [2, 3, 0, 0, 0], [3, 4, 0, 0, 0]]
    vectors.append([-50, 5, 0, 0, 0])
    # beta 0.2 of 5: one cut at each end, (1 + 2 + 3) / 3 = 2 and (2 + 3 + 4) / 3 = 3.
    assert statistic(TrimmedMeanRule(0.2), vectors).tolist()[:2] == [2, 3]
    # beta 0.1 of 5: floor(0.5) = 0 cut, the plain mean.
    assert statistic(TrimmedMeanRule(0.1), vectors).tolist()[:2] == [11.2, 3]
    # As Flower and SciPy count: int(beta * n) in floating point (0.29 is just below 0.29).
    hundred = [[float(i), 0, 0, 0, 0] for i in range(100)]
    assert statistic(TrimmedMeanRule(0.29), hundred)[0] == np.mean(range(28, 72))


def test_krum_picks_the_lowest_score_and_the_first_institution_on_a_tie():
    # f = 1, n = 5: scores over the 2 nearest: 0 -> 1 + 4, 1 -> 1 + 1, 2 -> 1 + 1, 3 -> 1 + 4,
    # 100 -> 97^2 + 98^2. Institutions 1 and 2 tie: the first wins.
    vectors = [[float(x), 0, 0, 0, 0] for x in (0, 1, 2, 3, 100)]
    assert statistic(KrumRule(1), vectors)[0] == 1.0


def test_multi_krum_averages_the_m_best_scored_updates():
    vectors = [[float(x), 0, 0, 0, 0] for x in (0, 1, 2, 3, 100)]
    # The default m = n - f = 4: all but the outlier.
    assert statistic(MultiKrumRule(1), vectors)[0] == 1.5
    # m = 3: 1 and 2, then 0 and 3 tie (score 5): the first, 0.
    assert statistic(MultiKrumRule(1, keep=3), vectors)[0] == 1.0


@pytest.mark.parametrize("n", range(1, 9))
def test_the_coordinate_wise_rules_match_their_definitions(n: int):
    rng = np.random.default_rng(n)
    vectors = random_vectors(rng, n)
    assert np.allclose(statistic(MedianRule(), vectors), coordinate_median(vectors))
    for beta in (0.0, 0.1, 0.25, 0.4, 0.49):
        expected = coordinate_trimmed_mean(vectors, beta)
        assert np.allclose(statistic(TrimmedMeanRule(beta), vectors), expected)


@pytest.mark.parametrize(("f", "extra"), itertools.product((0, 1, 2), (0, 1, 3)))
def test_krum_and_multi_krum_match_their_definitions(f: int, extra: int):
    rng = np.random.default_rng(10 * f + extra)
    n = 2 * f + 3 + extra
    vectors = random_vectors(rng, n)
    assert np.array_equal(statistic(KrumRule(f), vectors), vectors[krum_index(vectors, f)])
    for m in (None, 1, 2, n):
        expected = multi_krum(vectors, f, n - f if m is None else m)
        assert np.allclose(statistic(MultiKrumRule(f, keep=m), vectors), expected)


@pytest.mark.parametrize(("f", "extra"), itertools.product((0, 1, 2), (0, 1, 2)))
def test_bulyan_matches_its_definition(f: int, extra: int):
    rng = np.random.default_rng(100 + 10 * f + extra)
    n = 4 * f + 3 + extra
    vectors = random_vectors(rng, n)
    # A Byzantine institution far out in one coordinate only.
    vectors[-1][3] = 50.0
    result = statistic(BulyanRule(f), vectors)
    assert np.allclose(result, bulyan(vectors, f))
    if f:
        assert abs(result[3]) < 5


def test_bulyan_selects_recursively_as_the_paper_does_not_in_one_pass_as_flower():
    from flwr.app import RecordDict
    from flwr.serverapp.strategy.multikrum import select_multikrum

    vectors = [[1, -4], [2, 4], [-3, 0], [-2, 4], [-5, 0], [4, -1], [-4, 3]]
    changes = [[np.array(v, dtype=np.float64)] for v in vectors]
    # Krum again on those left: institution 0 joins in the end, 4 does not.
    assert bulyan_selection(squared_distances(changes), 1, 5) == [0, 1, 2, 3, 6]
    assert bulyan_selected([[float(x) for x in v] for v in vectors], 1) == [0, 1, 2, 3, 6]
    contents = [
        RecordDict({"arrays": ArrayRecord({"w": Array(np.array(v, np.float32))})}) for v in vectors
    ]
    one_pass = select_multikrum(contents, num_malicious_nodes=1, num_nodes_to_select=5)
    assert sorted(next(i for i, c in enumerate(contents) if c is s) for s in one_pass) == [
        1,
        2,
        3,
        4,
        6,
    ]


def test_squared_distances_are_exact_for_close_long_vectors():
    # A model's weights are long and its institutions' versions close: distances must not
    # cancel (each update's distance to itself is zero, to the other 4 * 1e-6^2).
    big = np.full(1000, 1e3)
    changes = [[big], [big + 2e-6], [big - 0.0]]
    distances = squared_distances(changes)
    assert distances[0, 0] == 0 and distances[0, 2] == 0
    assert distances[0, 1] == pytest.approx(1000 * 4e-12, rel=1e-3)


# Bulyan with f = 1 or 2 scores one of its steps with a single neighbour, where the two
# closest updates always tie: there institution order decides (the strategy sorts replies).
ROBUST: list[Callable[[], RobustRule]] = [
    MedianRule,
    lambda: TrimmedMeanRule(0.2),
    lambda: KrumRule(1),
    lambda: MultiKrumRule(1),
    lambda: BulyanRule(3),
]


@pytest.mark.parametrize("make", ROBUST, ids=lambda make: describe(make()))
def test_a_robust_rule_does_not_depend_on_the_order_of_distinct_updates(make):
    rule = make()
    rng = np.random.default_rng(7)
    vectors = random_vectors(rng, rule.minimum_updates + 2)
    expected = statistic(rule, vectors)
    for _ in range(10):
        order = rng.permutation(len(vectors))
        assert np.allclose(statistic(rule, [vectors[i] for i in order]), expected)


# -- On models: names, dtypes, the fewest updates -------------------------------------------
def record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


def test_a_robust_rule_moves_the_model_by_its_statistic_of_the_changes():
    current = record(w=np.array([1.0, 1.0], np.float32), n=np.array([7], np.int64))
    models = [[1.5, 0.0], [4.0, 2.0], [2.0, 3.0]]
    updates = [
        # Array order differs from the model's: names decide.
        Update(f"i{k}", record(n=np.array([k], np.int64), w=np.array(m, np.float32)), 1)
        for k, m in enumerate(models)
    ]
    result = MedianRule().aggregate(current, updates, asked=3, server_round=1)
    assert result is not None
    assert result["w"].numpy().tolist() == [2.0, 2.0] and result["w"].numpy().dtype == np.float32
    assert result["n"].numpy().tolist() == [7]  # not trained: kept
    assert MedianRule().aggregate(current, [], asked=3, server_round=1) is None


def test_a_rule_refuses_fewer_updates_than_it_is_defined_for():
    current = record(w=np.zeros(2, np.float32))
    updates = [Update(f"i{k}", record(w=np.full(2, k, np.float32)), 1) for k in range(6)]
    expectations = (
        (KrumRule(1), 5, r"krum rule got 4 .* n >= 2f \+ 3 = 5 \(f = aggregation.byzantine = 1\)"),
        (MultiKrumRule(0, keep=4), 4, r"multi-krum rule got 3 .* n >= m = aggregation.keep = 4"),
        (BulyanRule(1), 7, r"bulyan rule got 6 updates; it needs n >= 4f \+ 3 = 7"),
    )
    for rule, minimum, reason in expectations:
        assert rule.minimum_updates == minimum
        with pytest.raises(ValueError, match=reason):
            rule.combine(current, updates[: minimum - 1])
        if minimum <= len(updates):
            rule.combine(current, updates[:minimum])  # defined from there on
    for simple in (FedAvgRule(), MedianRule(), TrimmedMeanRule(0.49)):
        assert simple.minimum_updates == 1
        assert simple.combine(current, updates[:1])["w"].numpy().tolist() == [0.0, 0.0]


# -- Central DP: the norm bound and the sensitivity -----------------------------------------
C = 1.0
SENSITIVITY_RULES: list[Callable[[], RobustRule]] = [
    MedianRule,
    TrimmedMeanRule,
    lambda: TrimmedMeanRule(0.3),
    lambda: TrimmedMeanRule(0.45),
    lambda: KrumRule(0),
    lambda: KrumRule(1),
    lambda: MultiKrumRule(1),
    lambda: MultiKrumRule(1, keep=2),
    lambda: BulyanRule(0),
    lambda: BulyanRule(1),
]


def central(rule: RobustRule, vectors: Sequence[Sequence[float]], asked: int) -> np.ndarray:
    like = as_arrays([0.0] * 5)
    total, divisor = rule.central_sum([as_arrays(v) for v in vectors], like=like, asked=asked)
    assert divisor == 1
    return flat(total)


def clipped(vectors: np.ndarray) -> list[Vector]:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors * np.minimum(1.0, C / np.maximum(norms, 1e-300))).tolist()


def adversaries(rng: np.random.Generator, vectors: Sequence[Vector]) -> list[Vector]:
    """Replacements that push hard: another update negated, a coordinate spike, a random
    direction, zero."""
    spikes = [[C if k == j else 0.0 for k in range(5)] for j in range(5)]
    negated = [[-x for x in vector] for vector in vectors[:2]]
    return [*spikes, *negated, *clipped(rng.normal(0, 10, (2, 5))), [0.0] * 5]


@pytest.mark.parametrize("make", SENSITIVITY_RULES, ids=lambda make: describe(make()))
def test_one_institution_moves_a_robust_release_by_at_most_its_sensitivity(make):
    rule = make()
    rng = np.random.default_rng(2024)
    asked = rule.minimum_updates + 3
    bound = rule.sensitivity(asked) * C * (1 + 1e-9)
    worst = 0.0
    for _ in range(30):
        n = int(rng.integers(0, asked + 1))
        scale = rng.choice([0.1, 1.0, 10.0])  # 10: every change clipped to norm C
        vectors = clipped(rng.normal(0.0, scale, (n, 5)))
        release = central(rule, vectors, asked)
        if n >= rule.minimum_updates:
            assert np.linalg.norm(release) <= rule.norm_bound(n) * C * (1 + 1e-9)
        neighbours = [vectors[:i] + vectors[i + 1 :] for i in range(n)]  # one removed
        for replacement in adversaries(rng, vectors):
            neighbours += [[*vectors[:i], replacement, *vectors[i + 1 :]] for i in range(n)]
            if n < asked:
                neighbours.append([*vectors, replacement])  # one added
        for neighbour in neighbours:
            moved = float(np.linalg.norm(central(rule, neighbour, asked) - release))
            worst = max(worst, moved)
            assert moved <= bound
    assert worst > 0.5 * C  # the sets do move the release: the check is not vacuous


@pytest.mark.parametrize(
    ("rule", "n"),
    [(MedianRule(), 5), (MedianRule(), 6), (TrimmedMeanRule(0.2), 10), (TrimmedMeanRule(0.3), 7)],
)
def test_the_coordinate_wise_norm_bound_is_reached(rule: RobustRule, n: int):
    """Values a or 0, each of n coordinates held by n - k vectors (cyclically): every vector
    has norm C and the statistic is a everywhere, of norm sqrt(n / (n - k)) C = B(n) C."""
    k = int(rule.trim_fraction * n) if isinstance(rule, TrimmedMeanRule) else (n - 1) // 2
    a = C / math.sqrt(n - k)
    vectors = [[a if (j - i) % n < n - k else 0.0 for j in range(n)] for i in range(n)]
    changes = [[np.asarray(v)] for v in vectors]
    result = rule.statistic(changes)[0]
    assert np.allclose(result, a)
    assert np.linalg.norm(result) == pytest.approx(rule.norm_bound(n) * C)
    assert rule.norm_bound(n) == pytest.approx(math.sqrt(n / (n - k)))


def test_the_sensitivities_as_derived():
    assert FedAvgRule().sensitivity(50) == 1.0
    # Median: B^2 = 2n/(n+1) (odd), 2n/(n+2) (even), largest at the largest odd n asked.
    assert MedianRule().sensitivity(1) == 2.0
    assert MedianRule().sensitivity(6) == pytest.approx(2 * math.sqrt(5 / 3))
    assert MedianRule().sensitivity(10_000) < 2 * math.sqrt(2)
    # Trimmed mean: B^2 = n / (n - floor(beta n)) <= 1 / (1 - beta), reached at n = 10.
    assert TrimmedMeanRule(0.1).sensitivity(9) == 2.0
    assert TrimmedMeanRule(0.1).sensitivity(10) == pytest.approx(2 / math.sqrt(0.9))
    assert KrumRule(3).sensitivity(100) == MultiKrumRule(3).sensitivity(100) == 2.0
    # Bulyan f = 1: theta = 5 at n = 7, beta = 3 = ceil(5/2): B^2 = 5/3; n = 8: 6/4.
    assert BulyanRule(1).sensitivity(8) == pytest.approx(2 * math.sqrt(5 / 3))
    # Bulyan f = 4 at n = 19: theta = 11, beta = 3 (Jensen alone: 11/3), ceil(11/2) = 6.
    assert BulyanRule(4).sensitivity(19) == pytest.approx(2 * math.sqrt(11 / 6))
    # Asked fewer than a rule needs: the bound of its smallest defined round.
    assert BulyanRule(1).sensitivity(2) == BulyanRule(1).sensitivity(7)


def test_under_central_dp_too_few_updates_release_a_zero_change():
    like = as_arrays([0.0] * 5)
    changes = [as_arrays([0.5, 0, 0, 0, 0])] * 4
    total, divisor = KrumRule(1).central_sum(changes, like=like, asked=6)  # needs 5
    assert divisor == 1 and not flat(total).any()
    total, _ = KrumRule(1).central_sum([*changes, as_arrays([0.5, 0, 0, 0, 0])], like=like, asked=6)
    assert flat(total).tolist() == [0.5, 0, 0, 0, 0]
