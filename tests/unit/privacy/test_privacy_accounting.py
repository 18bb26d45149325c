"""confide.privacy.accounting against Opacus's own accountants and data loader."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from confide.privacy import accounting
from confide.privacy.accounting import (
    epsilon,
    noise_for_budget,
    sample_rate_and_steps,
)

DELTA = 1e-5

HISTORIES = [
    pytest.param([(1.0, 0.01, 1)], id="one-step"),
    pytest.param([(1.1, 0.02, 500)], id="single-entry"),
    pytest.param([(0.7, 0.1, 30)], id="low-noise-high-rate"),
    pytest.param([(4.0, 1.0, 10)], id="full-batch"),
    pytest.param([(1.1, 0.01, 100), (0.8, 0.05, 30)], id="two-entries"),
    pytest.param(
        [(1.5, 0.01, 250), (1.2, 0.1, 12), (1.5, 0.01, 250), (2.3, 0.5, 3)],
        id="four-entries-repeated-sigma-q",
    ),
]


def opacus_rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    reference = RDPAccountant()
    reference.history = list(history)
    return float(reference.get_epsilon(delta=delta))


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_rdp_epsilon_equals_opacus_rdp_accountant(history, delta):
    assert epsilon(history, delta) == pytest.approx(opacus_rdp_epsilon(history, delta), rel=1e-9)


def test_rdp_epsilon_is_order_independent_and_additive_over_entries():
    """Splitting one entry's steps over two entries, in either order, changes nothing."""
    whole = epsilon([(1.0, 0.05, 300)], DELTA)
    split = epsilon([(1.0, 0.05, 100), (1.0, 0.05, 200)], DELTA)
    assert split == pytest.approx(whole, rel=1e-12)
    mixed = [(1.0, 0.05, 100), (2.0, 0.2, 40)]
    assert epsilon(mixed, DELTA) == pytest.approx(epsilon(mixed[::-1], DELTA), rel=1e-12)


def test_epsilon_of_empty_history_is_zero():
    assert epsilon([], DELTA) == 0.0
    assert epsilon([], DELTA, accountant="prv") == 0.0


def test_epsilon_grows_with_steps():
    values = [epsilon([(1.0, 0.05, steps)], DELTA) for steps in (10, 100, 1000)]
    assert values[0] < values[1] < values[2]


def test_prv_epsilon_is_positive_finite_and_tighter_than_rdp():
    history = [(1.1, 0.01, 100), (0.8, 0.05, 30)]
    prv = epsilon(history, DELTA, accountant="prv")
    rdp = epsilon(history, DELTA, accountant="rdp")
    assert math.isfinite(prv)
    assert 0.0 < prv < rdp


@pytest.mark.parametrize(
    ("target", "rate", "steps"),
    [(1.0, 0.01, 1000), (1.0, 0.05, 200), (2.0, 0.05, 1000), (1.0, 1.0, 5)],
)
def test_noise_for_budget_meets_target_tightly(target, rate, steps):
    sigma = noise_for_budget(target, DELTA, rate, steps)
    spent = epsilon([(sigma, rate, steps)], DELTA)
    assert spent <= target
    assert spent >= 0.98 * target
    assert opacus_rdp_epsilon([(sigma, rate, steps)], DELTA) <= target


def test_noise_for_budget_larger_target_needs_less_noise():
    sigmas = [noise_for_budget(target, DELTA, 0.05, 200) for target in (0.5, 1.0, 2.0)]
    assert sigmas == sorted(sigmas, reverse=True)
    assert len(set(sigmas)) == len(sigmas)


def test_noise_for_budget_more_steps_need_more_noise():
    assert noise_for_budget(2.0, DELTA, 0.05, 1000) > noise_for_budget(2.0, DELTA, 0.05, 200)


def opacus_loader(examples: int, batch_size: int) -> DPDataLoader:
    data = TensorDataset(torch.zeros(examples, 1))
    return DPDataLoader.from_data_loader(DataLoader(data, batch_size=batch_size))


@pytest.mark.parametrize(
    ("examples", "batch_size"),
    [(1, 1), (3, 1), (10, 3), (100, 10), (101, 10), (200, 20), (1797, 32), (50, 64), (64, 64)],
)
def test_sample_rate_and_steps_match_opacus_dp_data_loader(examples, batch_size):
    rate, steps = sample_rate_and_steps(examples, batch_size)
    loader = opacus_loader(examples, batch_size)
    assert rate == loader.sample_rate
    assert rate == 1.0 / math.ceil(examples / batch_size)
    assert steps == len(loader) == math.ceil(examples / batch_size)


def test_sample_rate_and_steps_never_plan_fewer_steps_than_opacus_takes():
    """Planned noise stays conservative: Opacus takes int(1 / q) steps per epoch, which is
    ceil(n / B) or, through floating point, one fewer, never more."""
    for examples in range(1, 400):
        _, planned = sample_rate_and_steps(examples, 1)
        taken = len(opacus_loader(examples, 1))
        assert planned - 1 <= taken <= planned, examples


def test_sample_rate_is_one_when_the_batch_holds_every_example():
    assert sample_rate_and_steps(10, 10) == (1.0, 1)
    assert sample_rate_and_steps(10, 1000) == (1.0, 1)


def test_rdp_orders_are_opacus_defaults():
    assert list(RDPAccountant.DEFAULT_ALPHAS) == accounting.RDP_ORDERS
