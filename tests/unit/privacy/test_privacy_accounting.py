"""confide.privacy.accounting against Opacus's own accountants and data loader."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from confide.privacy import accounting
from confide.privacy.accounting import (
    EPSILON_TOLERANCE,
    epsilon,
    grouped_history,
    noise_for_budget,
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
    assert epsilon([], DELTA, accountant="pld") == 0.0


def test_epsilon_grows_with_steps():
    values = [epsilon([(1.0, 0.05, steps)], DELTA) for steps in (10, 100, 1000)]
    assert values[0] < values[1] < values[2]


def test_prv_epsilon_is_positive_finite_and_tighter_than_rdp():
    history = [(1.1, 0.01, 100), (0.8, 0.05, 30)]
    prv = epsilon(history, DELTA, accountant="prv")
    rdp = epsilon(history, DELTA, accountant="rdp")
    assert math.isfinite(prv)
    assert 0.0 < prv < rdp


# The bundled scenarios' histories at their RDP-calibrated sigma for epsilon 8, delta 1e-5
# (noise_for_budget(8.0, 1e-5, q, steps)): q and steps per round as Opacus's DPDataLoader
# derives them from each simulated institution's training examples and the batch size.
WORKLOADS = [
    # digits-dp on 3 institutions for 2 rounds (n 431, batch 64): q 1/7, 7 steps a round
    pytest.param([(0.7831, 1 / 7, 14)], id="simulated-digits-dp-2-rounds"),
    # digits-dp (5 institutions, n 258 or 259, batch 64): q 0.2, 5 steps, 30 rounds
    pytest.param([(1.785888671875, 0.2, 5)] * 30, id="digits-dp-30-rounds"),
    # breast-cancer-dp (n 70, batch 16; n 153 and 159, batch 16), 20 rounds
    pytest.param([(1.5356, 0.2, 5)] * 20, id="breast-cancer-dp-small-institution"),
    pytest.param([(1.1957, 0.1, 10)] * 20, id="breast-cancer-dp-large-institution"),
]


def test_pld_epsilon_of_a_step_without_noise_is_unbounded():
    assert epsilon([(1.0, 0.1, 5), (0.0, 0.1, 1)], DELTA, "pld") == math.inf
    # ... unless it took no step
    assert epsilon([(0.0, 0.1, 0), (1.0, 0.1, 5)], DELTA, "pld") == epsilon(
        [(1.0, 0.1, 5)], DELTA, "pld"
    )


def test_grouped_history_sums_the_steps_of_identical_terms():
    history = [(1.5, 0.01, 250), (1.2, 0.1, 12), (1.5, 0.01, 250), (2.3, 0.5, 0)]
    assert grouped_history(history) == ((1.2, 0.1, 12), (1.5, 0.01, 500))


def test_pld_epsilon_is_the_same_for_split_and_reordered_histories():
    whole = epsilon([(1.0, 0.05, 300), (2.0, 0.2, 40)], DELTA, "pld")
    split = epsilon([(2.0, 0.2, 40), (1.0, 0.05, 100), (1.0, 0.05, 200)], DELTA, "pld")
    assert split == whole


def test_pld_epsilon_is_cached_per_grouped_history_and_delta():
    before = accounting._pld_epsilon.cache_info()
    first = epsilon([(1.3, 0.1, 70)], DELTA, "pld")
    again = epsilon([(1.3, 0.1, 30), (1.3, 0.1, 40)], DELTA, "pld")
    other_delta = epsilon([(1.3, 0.1, 70)], 1e-6, "pld")
    after = accounting._pld_epsilon.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (2, 1)
    assert again == first < other_delta


def test_pld_epsilon_grows_with_steps():
    values = [epsilon([(1.0, 0.05, steps)], DELTA, "pld") for steps in (10, 100, 1000)]
    assert values[0] < values[1] < values[2]


@pytest.mark.parametrize("history", WORKLOADS)
def test_pld_is_tighter_than_rdp_on_the_bundled_workloads(history):
    pld, rdp = epsilon(history, DELTA, "pld"), epsilon(history, DELTA, "rdp")
    assert 0.0 < pld < 0.95 * rdp


@pytest.mark.parametrize(
    ("target", "rate", "steps"), [(8.0, 0.2, 150), (8.0, 1 / 7, 14), (1.0, 0.05, 200)]
)
def test_pld_noise_for_budget_meets_target_tightly_with_less_noise_than_rdp(target, rate, steps):
    sigma = noise_for_budget(
        target_epsilon=target, delta=DELTA, sample_rate=rate, steps=steps, accountant="pld"
    )
    spent = epsilon([(sigma, rate, steps)], DELTA, "pld")
    assert target - EPSILON_TOLERANCE <= spent <= target
    assert sigma < noise_for_budget(
        target_epsilon=target, delta=DELTA, sample_rate=rate, steps=steps, accountant="rdp"
    )
    # RDP would report this sigma over the target: the saving is the accountant's, not a bug.
    assert epsilon([(sigma, rate, steps)], DELTA, "rdp") > target


def test_pld_noise_for_budget_larger_target_needs_less_noise():
    sigmas = [
        noise_for_budget(
            target_epsilon=target, delta=DELTA, sample_rate=0.05, steps=200, accountant="pld"
        )
        for target in (0.5, 1.0, 2.0)
    ]
    assert sigmas == sorted(sigmas, reverse=True)
    assert len(set(sigmas)) == len(sigmas)


@pytest.mark.parametrize(
    ("target", "delta", "rate", "steps"),
    [
        pytest.param(1e-6, 1e-8, 1.0, 1, id="needs-sigma-over-1e6"),
        pytest.param(8.0, DELTA, 0.2, 0, id="no-steps"),
        pytest.param(8.0, DELTA, 0.0, 10, id="no-sampling"),
        pytest.param(0.0, DELTA, 0.2, 10, id="zero-target"),
    ],
)
def test_pld_noise_for_budget_raises_value_error_when_the_target_cannot_be_met(
    target, delta, rate, steps
):
    with pytest.raises(ValueError):
        noise_for_budget(
            target_epsilon=target, delta=delta, sample_rate=rate, steps=steps, accountant="pld"
        )


@pytest.mark.parametrize(
    ("target", "rate", "steps"),
    [(1.0, 0.01, 1000), (1.0, 0.05, 200), (2.0, 0.05, 1000), (1.0, 1.0, 5)],
)
def test_noise_for_budget_meets_target_tightly(target, rate, steps):
    sigma = noise_for_budget(target_epsilon=target, delta=DELTA, sample_rate=rate, steps=steps)
    spent = epsilon([(sigma, rate, steps)], DELTA)
    assert spent <= target
    assert spent >= 0.98 * target
    assert opacus_rdp_epsilon([(sigma, rate, steps)], DELTA) <= target


def test_noise_for_budget_larger_target_needs_less_noise():
    sigmas = [
        noise_for_budget(target_epsilon=target, delta=DELTA, sample_rate=0.05, steps=200)
        for target in (0.5, 1.0, 2.0)
    ]
    assert sigmas == sorted(sigmas, reverse=True)
    assert len(set(sigmas)) == len(sigmas)


def test_noise_for_budget_more_steps_need_more_noise():
    assert noise_for_budget(
        target_epsilon=2.0, delta=DELTA, sample_rate=0.05, steps=1000
    ) > noise_for_budget(target_epsilon=2.0, delta=DELTA, sample_rate=0.05, steps=200)


def test_rdp_orders_are_opacus_defaults():
    assert list(RDPAccountant.DEFAULT_ALPHAS) == accounting.RDP_ORDERS


def test_a_ledger_epsilon_is_computed_without_importing_torch():
    """`confide-client start` reads the ledger for its /metrics: Opacus's RDP analysis is
    loaded without Opacus's package (which imports torch)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from confide.privacy.accounting import epsilon\n"
        "print(epsilon([(1.0, 0.01, 1000)], 1e-5, 'rdp'))\n"
        "print('torch' in sys.modules, 'opacus' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[1] == "False False"
    assert float(out[0]) > 0


def test_the_rdp_analysis_loaded_apart_gives_opacus_own_numbers():
    from opacus.accountants.analysis import rdp as opacus_rdp

    from confide.privacy.accounting import RDP_ORDERS, _rdp_analysis_from_file

    apart = _rdp_analysis_from_file()
    assert apart is not opacus_rdp
    for q, sigma, steps in [(0.01, 1.0, 1000), (0.2, 0.7, 30), (1.0, 3.0, 5)]:
        ours = steps * np.asarray(apart.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                                    orders=RDP_ORDERS))  # fmt: skip
        theirs = np.asarray(
            opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=RDP_ORDERS)
        )
        np.testing.assert_allclose(ours, theirs, rtol=1e-12)
        assert (
            apart.get_privacy_spent(orders=RDP_ORDERS, rdp=ours, delta=1e-5)[0]
            == (opacus_rdp.get_privacy_spent(orders=RDP_ORDERS, rdp=theirs, delta=1e-5)[0])
        )
