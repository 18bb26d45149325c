"""The DP-SGD mechanism depends on public values only (issue 10, finding 1).

The audit: with q, steps, sigma and the divisor derived from the private example count n, one
round's update norm told n = 256 from n = 257 (B = 64) perfectly. Now they follow from the
institution's declared size N; n only decides which examples the Poisson draws pick.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from confide.privacy.accounting import noise_for_budget
from confide.privacy.config import PrivacyConfig, TrainConfig
from confide.privacy.mechanism import DeltaTooLarge, check_delta, plan_round, sampling
from confide.privacy.trainer import train_round
from confide.tasks.datasets import Dataset

TRAIN = TrainConfig(batch_size=64, lr=1.0)
PRIVACY = PrivacyConfig(target_epsilon=8.0, delta=1e-5)
DECLARED = 256
ROUNDS = 30


def update_norms(data: Dataset, declared: int, trials: int, start: int) -> np.ndarray:
    """L2 norm of one round's model update, one trial per seed, from the same start model."""
    mechanism = plan_round(PRIVACY, TRAIN, declared_examples=declared, planned_rounds=ROUNDS)
    base = nn.Linear(data.features, data.classes)
    nn.init.zeros_(base.weight)
    nn.init.zeros_(base.bias)
    norms = []
    for seed in range(start, start + trials):
        model = nn.Linear(data.features, data.classes)
        model.load_state_dict(base.state_dict())
        result = train_round(
            model, data, train=TRAIN, privacy=PRIVACY, mechanism=mechanism, history=[], seed=seed
        )
        change = [result.state[name] - value for name, value in base.state_dict().items()]
        norms.append(float(torch.sqrt(sum((c**2).sum() for c in change))))
    return np.asarray(norms)


def auc(first: np.ndarray, second: np.ndarray) -> float:
    """How well the update norm separates the two datasets (0.5: not at all)."""
    labels = np.r_[np.zeros(len(first)), np.ones(len(second))]
    return float(roc_auc_score(labels, np.r_[first, second]))


@pytest.fixture(scope="module")
def neighbours(digits: Dataset) -> tuple[Dataset, Dataset]:
    """n = 256 and n + 1 = 257 digits: the second adds one example to the first."""
    return digits.subset(np.arange(256)), digits.subset(np.arange(257))


def test_the_mechanism_follows_the_declared_size_and_the_job():
    one = plan_round(PRIVACY, TRAIN, declared_examples=DECLARED, planned_rounds=ROUNDS)
    assert (one.sample_rate, one.steps, one.divisor) == (0.25, 4, 64.0)
    assert one.noise_multiplier == noise_for_budget(
        target_epsilon=8.0, delta=1e-5, sample_rate=0.25, steps=4 * ROUNDS, accountant="rdp"
    )


def test_n_and_n_plus_one_examples_train_with_identical_parameters_and_divisor(neighbours):
    mechanism = plan_round(PRIVACY, TRAIN, declared_examples=DECLARED, planned_rounds=ROUNDS)
    results = [
        train_round(
            nn.Linear(64, 10),
            data,
            train=TRAIN,
            privacy=PRIVACY,
            mechanism=mechanism,
            history=[],
            seed=0,
        )
        for data in neighbours
    ]
    published = [
        (r.sample_rate, r.steps, r.noise_multiplier, r.divisor, r.history, r.epsilon)
        for r in results
    ]
    assert published[0] == published[1]
    assert [r.examples for r in results] == [256, 257]  # the data did differ


def test_one_rounds_update_norm_does_not_separate_n_from_n_plus_one(neighbours):
    smaller, larger = neighbours
    trials = 300
    separation = auc(
        update_norms(smaller, DECLARED, trials, 0), update_norms(larger, DECLARED, trials, trials)
    )
    # Chance gives 0.5 with a standard deviation of about 0.024 at 300 + 300 trials.
    assert abs(separation - 0.5) < 0.1, separation


def test_the_same_attack_separates_a_mechanism_sized_by_the_private_count(neighbours):
    """The control: the statistic above does catch the audited design (parameters from n)."""
    smaller, larger = neighbours
    trials = 100
    separation = auc(
        update_norms(smaller, len(smaller), trials, 0),
        update_norms(larger, len(larger), trials, trials),
    )
    assert separation > 0.9, separation


@pytest.mark.parametrize(
    ("declared", "batch", "expected"),
    [(256, 64, (0.25, 4)), (257, 64, (0.2, 5)), (10, 1000, (1.0, 1)), (93, 1, (1 / 93, 93))],
)
def test_sampling_rate_and_batches_follow_the_declared_size(declared, batch, expected):
    assert sampling(declared, batch) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("declared", "batch_size"),
    [(1, 1), (3, 1), (10, 3), (100, 10), (101, 10), (200, 20), (1797, 32), (50, 64), (64, 64)],
)
def test_the_rate_is_the_one_opacus_would_take_for_the_declared_size(declared, batch_size):
    """q = 1/ceil(N/B) as Opacus's DPDataLoader takes it for N examples; the batches per
    epoch are ceil(N/B) computed in integers (Opacus's int(1/q) can lose one)."""
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    loader = DPDataLoader.from_data_loader(
        DataLoader(TensorDataset(torch.zeros(declared, 1)), batch_size=batch_size)
    )
    rate, batches = sampling(declared, batch_size)
    assert rate == loader.sample_rate
    assert batches == -(-declared // batch_size) and batches - 1 <= len(loader) <= batches


def test_the_divisor_is_the_expected_batch_at_the_declared_size():
    mechanism = plan_round(
        PRIVACY, TrainConfig(batch_size=64), declared_examples=100, planned_rounds=5
    )
    assert mechanism.divisor == pytest.approx(50.0)  # q = 1/2, N = 100


def test_delta_must_be_below_one_over_the_declared_size():
    check_delta(1e-5, 1000)
    with pytest.raises(DeltaTooLarge, match=r"1/N = 0\.01 for a declared size of 100"):
        check_delta(0.01, 100)
