"""Central DP's aggregate: clipped updates summed, divided by the number asked, plus noise."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from confide.privacy.config import CentralPrivacyConfig
from confide.server.central_dp import CentralDP

CONFIG = CentralPrivacyConfig(enabled=True, noise_multiplier=1.0, clipping_norm=1.0)


def record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


CURRENT = record(w=np.zeros((2, 2), np.float32), b=np.zeros(3, np.float32))


def aggregate(updates: list[ArrayRecord], sampled: int = 4) -> dict[str, np.ndarray]:
    # The same seed and round: the same noise, so differences isolate the clipped sum.
    result = CentralDP(CONFIG, noise_seed=0).aggregate(CURRENT, updates, sampled, 1)
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
    dp = CentralDP(CONFIG.model_copy(update={"noise_multiplier": 3.0}), noise_seed=1)
    wide = ArrayRecord({"w": Array(np.zeros(200_000, np.float32))})
    noisy = dp.aggregate(wide, [], 5, 1)["w"].numpy()
    assert noisy.std() == pytest.approx(3.0 * 1.0 / 5, rel=0.01)
    assert dp.releases == [5]


def test_an_unchanged_model_is_a_zero_update_not_a_crash():
    assert np.allclose(aggregate([CURRENT])["w"], aggregate([])["w"])
