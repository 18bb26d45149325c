"""Central DP's aggregate: clipped updates combined by the wrapped rule (fedavg's central form:
summed and divided by the number asked; a robust rule's: its statistic, divisor 1), plus noise
calibrated to the rule's sensitivity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from confide.privacy.config import CentralPrivacyConfig
from confide.server.aggregation import (
    RULES,
    AggregationRule,
    FedAvgRule,
    KrumRule,
    MedianRule,
    Update,
)
from confide.server.central_dp import CentralDP

CONFIG = CentralPrivacyConfig(enabled=True, noise_multiplier=1.0, clipping_norm=1.0)


def record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


CURRENT = record(w=np.zeros((2, 2), np.float32), b=np.zeros(3, np.float32))


def updates_of(*records: ArrayRecord) -> list[Update]:
    # Weights play no part under central DP: different ones must not change anything.
    return [Update(f"i{k}", record, weight=10 * k + 1) for k, record in enumerate(records)]


def aggregate(updates: list[ArrayRecord], sampled: int = 4) -> dict[str, np.ndarray]:
    # The same seed and round: the same noise, so differences isolate the clipped sum.
    dp = CentralDP(CONFIG, FedAvgRule(), noise_seed=0)
    result = dp.aggregate(CURRENT, updates_of(*updates), asked=sampled, server_round=1)
    return {name: array.numpy().astype(np.float64) for name, array in result.items()}


def test_each_update_counts_at_most_the_clipping_norm_divided_by_those_asked():
    big = record(w=np.full((2, 2), 10.0, np.float32), b=np.full(3, 10.0, np.float32))
    small = record(w=np.full((2, 2), 0.1, np.float32), b=np.zeros(3, np.float32))
    baseline = aggregate([])
    for update, norm in ((big, 1.0), (small, 0.2)):  # ||small|| = 0.2 < C: unchanged
        moved = aggregate([update])
        shift = np.sqrt(sum(((moved[k] - baseline[k]) ** 2).sum() for k in moved))
        assert shift == pytest.approx(norm / 4, rel=1e-5)


def test_refusals_do_not_shrink_the_divisor_and_array_order_does_not_matter():
    update = record(b=np.full(3, 0.1, np.float32), w=np.full((2, 2), 0.1, np.float32))
    one = aggregate([update], sampled=4)
    baseline = aggregate([], sampled=4)
    assert np.allclose(one["w"] - baseline["w"], 0.1 / 4, atol=1e-6)
    with pytest.raises(ValueError, match="2 updates from a round that asked 1"):
        aggregate([update, update], sampled=1)


def test_the_noise_has_the_stated_scale():
    config = CONFIG.model_copy(update={"noise_multiplier": 3.0})
    dp = CentralDP(config, FedAvgRule(), noise_seed=1)
    wide = ArrayRecord({"w": Array(np.zeros(200_000, np.float32))})
    noisy = dp.aggregate(wide, [], asked=5, server_round=1)["w"].numpy()
    assert noisy.std() == pytest.approx(3.0 * 1.0 / 5, rel=0.01)
    assert dp.releases == [5]


def test_an_unchanged_model_is_a_zero_update_not_a_crash():
    assert np.allclose(aggregate([CURRENT])["w"], aggregate([])["w"])


# Frozen before central DP became a wrapper around the aggregation rule: the output of the
# former `CentralDP(config, noise_seed=11).aggregate(current, updates, 4, 3)` on these inputs,
# to the bit (float32 values written exactly; the int64 array is kept as it was).
FROZEN_CURRENT = {
    "w": [
        [-0.8019314408302307, -1.3243589401245117, -0.24836161732673645],
        [0.4204452335834503, 1.1360465288162231, 0.10970640182495117],
    ],
    "b": [-0.5526472926139832, -0.7847803831100464, 0.7487457990646362],
}
FROZEN_UPDATES = [
    {
        "w": [
            [2.467634677886963, -0.7788214087486267, -2.7150189876556396],
            [-1.4960851669311523, 4.336084842681885, 0.5154712796211243],
        ],
        "b": [2.447352647781372, 2.215219497680664, 3.748745918273926],
        "n": [9],
    },
    {
        "b": [-0.5426473021507263, -0.7747803926467896, 0.7587457895278931],
        "w": [
            [-0.8219314217567444, -1.3443589210510254, -0.2683616280555725],
            [0.40044522285461426, 1.1160465478897095, 0.0897064059972763],
        ],
        "n": [1],
    },
]
FROZEN_OUTPUT = {
    "w": [
        [-0.6587733626365662, -1.577506422996521, -0.2256181687116623],
        [0.611981213092804, 1.3415601253509521, 0.5109009742736816],
    ],
    "b": [-0.5964903235435486, -0.8462107181549072, 0.6840299367904663],
}
# SHA-256 of the float32 bytes of a digits-sized model (64-64-10) after 5 updates of 6 asked.
FROZEN_DIGEST = "cc4fae2df464e4f7e236049ad6f223e0f63d0be29c74bac841d8823eac9d65f5"


def frozen_record(values: dict[str, Any]) -> ArrayRecord:
    return ArrayRecord(
        {
            name: Array(np.array(value, np.int64 if name == "n" else np.float32))
            for name, value in values.items()
        }
    )


def test_the_wrapper_reproduces_the_former_central_dp_to_the_bit():
    current = frozen_record({**FROZEN_CURRENT, "n": [7]})
    updates = updates_of(*(frozen_record(update) for update in FROZEN_UPDATES))
    config = CentralPrivacyConfig(enabled=True, noise_multiplier=1.3, clipping_norm=0.7)
    dp = CentralDP(config, FedAvgRule(), noise_seed=11)
    result = dp.aggregate(current, updates, asked=4, server_round=3)
    for name, expected in FROZEN_OUTPUT.items():
        assert result[name].numpy().dtype == np.float32
        assert np.array_equal(result[name].numpy(), np.array(expected, np.float32))
    assert result["n"].numpy().tolist() == [7]  # not a float: kept, neither noised nor moved
    assert dp.releases == [4]


def test_the_wrapper_reproduces_the_former_central_dp_on_a_digits_sized_model():
    import hashlib

    rng = np.random.default_rng(2024)
    shapes = {"fc1.weight": (64, 64), "fc1.bias": (64,), "fc2.weight": (10, 64), "fc2.bias": (10,)}
    current = ArrayRecord(
        {k: Array(rng.normal(0, 0.3, s).astype(np.float32)) for k, s in shapes.items()}
    )
    models = [
        ArrayRecord(
            {
                k: Array((current[k].numpy() + rng.normal(0, 0.05 * (i + 1), s)).astype(np.float32))
                for k, s in shapes.items()
            }
        )
        for i in range(5)
    ]
    dp = CentralDP(CONFIG, FedAvgRule(), noise_seed=3)
    result = dp.aggregate(current, updates_of(*models), asked=6, server_round=2)
    digest = hashlib.sha256(b"".join(result[k].numpy().tobytes() for k in shapes)).hexdigest()
    assert digest == FROZEN_DIGEST


class _Median(AggregationRule):
    """A rule whose sensitivity nobody derived (as a median would be)."""

    name = "median-for-test"

    def combine(self, current: ArrayRecord, updates: Sequence[Update]) -> ArrayRecord:
        return updates[0].arrays


def test_a_rule_without_a_derived_sensitivity_is_refused_by_the_wrapper_and_the_job(monkeypatch):
    from pydantic import ValidationError

    from confide.server.job import JobConfig

    with pytest.raises(ValueError, match="cannot wrap the median-for-test rule"):
        CentralDP(CONFIG, _Median())
    monkeypatch.setitem(RULES, _Median.name, _Median)
    JobConfig.model_validate({"aggregation": {"rule": _Median.name}})  # fine without central DP
    with pytest.raises(ValidationError, match=r"aggregation\.rule 'median-for-test' has none"):
        JobConfig.model_validate(
            {"aggregation": {"rule": _Median.name}, "central_privacy": {"enabled": True}}
        )


def flat_shift(moved: dict[str, np.ndarray], baseline: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([(moved[k] - baseline[k]).ravel() for k in ("w", "b")])


def test_a_robust_rule_releases_its_statistic_of_the_clipped_changes_with_divisor_one():
    def release(rule: AggregationRule, models: list[ArrayRecord]) -> dict[str, np.ndarray]:
        dp = CentralDP(CONFIG, rule, noise_seed=5)
        result = dp.aggregate(CURRENT, updates_of(*models), asked=4, server_round=2)
        return {name: array.numpy().astype(np.float64) for name, array in result.items()}

    def model(w: float, b: float) -> ArrayRecord:
        return record(w=np.full((2, 2), w, np.float32), b=np.full(3, b, np.float32))

    # Changes (norms 2 * 3 = 6, 0.2 * 2 = 0.4 and 10 * sqrt(7)): clipped to C = 1 first, so
    # the far one counts as any other of norm 1, then the coordinate-wise median.
    models = [model(3.0, 0.0), model(0.2, 0.0), model(10.0, 10.0)]
    shift = flat_shift(release(MedianRule(), models), release(MedianRule(), []))
    clipped_w = sorted([0.5, 0.2, 1 / np.sqrt(7)])  # the w coordinates after clipping
    assert np.allclose(shift[:4], clipped_w[1], atol=1e-6)
    assert np.allclose(shift[4:], 0.0, atol=1e-6)  # b: 0, 0, 1/sqrt(7): the median is 0
    # Krum (f = 0, 3 updates, its nearest one counts): the first two are each other's nearest
    # (0.3^2 * 4 = 0.36, the third is farther from both), a tie the first institution wins;
    # the model moves by its clipped change (w 0.5, b 0), not divided by the 4 asked.
    krum = flat_shift(release(KrumRule(0), models), release(KrumRule(0), []))
    assert np.allclose(krum, [0.5] * 4 + [0.0] * 3, atol=1e-6)


def test_a_robust_rules_noise_is_scaled_by_its_sensitivity_and_fewer_updates_release_noise():
    config = CONFIG.model_copy(update={"noise_multiplier": 0.5})
    wide = ArrayRecord({"w": Array(np.zeros(200_000, np.float32))})
    dp = CentralDP(config, MedianRule(), noise_seed=1)
    noisy = dp.aggregate(wide, [], asked=5, server_round=1)["w"].numpy()
    # Median, asked 5: B^2 = max over n <= 5 of n / (n - floor((n - 1) / 2)) = 5/3, s = 2B.
    assert dp.sensitivity(5) == pytest.approx(2 * np.sqrt(5 / 3))
    assert noisy.std() == pytest.approx(0.5 * 1.0 * 2 * np.sqrt(5 / 3), rel=0.01)
    # Krum with f = 1 needs 5 updates: 2 of 6 asked release a zero change and the noise.
    dp = CentralDP(CONFIG, KrumRule(1), noise_seed=3)
    two = updates_of(record(w=np.ones((2, 2), np.float32), b=np.ones(3, np.float32)))
    some = dp.aggregate(CURRENT, [*two, *two], asked=6, server_round=1)
    none = CentralDP(CONFIG, KrumRule(1), noise_seed=3).aggregate(
        CURRENT, [], asked=6, server_round=1
    )
    for name in ("w", "b"):
        assert np.array_equal(some[name].numpy(), none[name].numpy())
    assert dp.releases == [6]
