"""confide's epsilons against an independent implementation: Google's dp-accounting.

The ledger's cumulative epsilon (Opacus's RDP analysis, composed over every job on a dataset)
and the coordinator's institution-level epsilon (Flower's RdpAccountant) are recomputed here
with dp-accounting's own RDP accountant and default orders. They agree within 1 %; at
integer orders the two RDP curves are identical, the small gap comes from fractional orders,
where dp-accounting sums the series' absolute values (an upper bound) and Opacus the signed
series.

The PLD accountant (confide's adaptive discretisation, entries grouped by (sigma, q)) is
recomputed with dp-accounting's PLDAccountant at a fixed, finer interval, composing the
entries one by one as given; and bracketed from below by dp-accounting's optimistic PLD.
"""

from __future__ import annotations

import logging

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.pld import privacy_loss_distribution as pld
from dp_accounting.rdp import RdpAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from confide.privacy.accounting import RDP_ORDERS, epsilon
from confide.privacy.config import CentralPrivacyConfig
from confide.privacy.ledger import Ledger, Spend
from confide.server.central_dp import central_epsilon

# dp-accounting logs every fractional order whose series it gives up on (and then skips it).
logging.getLogger("absl").setLevel(logging.ERROR)

LEDGERS = [
    pytest.param([(1.0, 0.2, 50)], id="one-job-small-data"),
    pytest.param([(1.1, 0.2, 20)] * 4, id="four-rounds-one-job"),
    pytest.param([(0.8, 0.05, 1000)], id="low-noise-many-steps"),
    pytest.param([(2.0, 0.01, 5000)], id="high-noise-low-rate"),
    pytest.param([(1.5, 0.1, 100), (0.9, 0.25, 40)], id="two-jobs-different-terms"),
    pytest.param([(5.0, 0.5, 10)], id="very-noisy"),
    pytest.param([(1.2, 0.0625, 160), (1.2, 0.0625, 160), (0.95, 0.125, 24)], id="three-jobs"),
]


def composed_epsilon(
    accountant: dp_accounting.PrivacyAccountant,
    history: list[tuple[float, float, int]],
    delta: float,
) -> float:
    """`accountant`'s epsilon at `delta` after one DP-SGD event per history entry, as given."""
    for sigma, rate, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def dp_accounting_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    return composed_epsilon(RdpAccountant(), history, delta)  # its default orders, not ours


@pytest.mark.parametrize("delta", [1e-5, 1e-6])
@pytest.mark.parametrize("history", LEDGERS)
def test_cumulative_epsilon_matches_dp_accounting_within_one_percent(history, delta):
    ours, theirs = epsilon(history, delta), dp_accounting_epsilon(history, delta)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_the_ledgers_reported_spend_over_two_jobs_matches_dp_accounting(tmp_path):
    ledger = Ledger(tmp_path).open()
    history = []
    for run, (sigma, rate, steps, rounds) in enumerate([(1.1, 0.2, 5, 4), (0.9, 0.1, 10, 3)]):
        for server_round in range(1, rounds + 1):
            ledger.record(
                Spend("default", "sha256:x", "job", str(run), server_round, 100, rate, sigma,
                      steps, 1e-5, "rdp")
            )  # fmt: skip
            history.append((sigma, rate, steps))
    (spent,) = ledger.spent(1e-5)
    assert spent.accountant == "rdp"
    assert spent.epsilon == pytest.approx(dp_accounting_epsilon(history, 1e-5), rel=0.01)


# dp-accounting's PLD at a fixed interval finer than (or, for thousands of steps, about as fine
# as) the one confide chooses; at 5e-4 it is within 0.003 % of the same at 1e-4 here.
REFERENCE_INTERVAL = 5e-4

PLD_HISTORIES = [
    pytest.param([(1.0, 0.2, 50)], id="one-job-small-data"),
    pytest.param([(0.8, 0.05, 1000)], id="low-noise-many-steps"),
    pytest.param([(2.0, 0.01, 5000)], id="high-noise-low-rate"),
    pytest.param([(5.0, 0.5, 10)], id="very-noisy"),
    pytest.param([(0.7831, 1 / 7, 14)], id="simulated-digits-dp"),
    pytest.param([(1.5, 0.1, 100), (0.9, 0.25, 40)], id="two-jobs-different-terms"),
    pytest.param([(1.2, 0.0625, 160), (1.2, 0.0625, 160), (0.95, 0.125, 24)], id="three-jobs"),
    pytest.param([(1.1, 0.2, 20), (2.0, 0.05, 300), (0.9, 0.1, 30)], id="three-terms"),
]


def dp_accounting_pld_epsilon(
    history: list[tuple[float, float, int]], delta: float, interval: float = REFERENCE_INTERVAL
) -> float:
    accountant = PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=interval,
    )
    return composed_epsilon(accountant, history, delta)


@pytest.mark.parametrize("delta", [1e-5, 1e-6])
@pytest.mark.parametrize("history", PLD_HISTORIES)
def test_pld_epsilon_matches_dp_accounting_within_one_percent(history, delta):
    ours, theirs = epsilon(history, delta, "pld"), dp_accounting_pld_epsilon(history, delta)
    assert ours == pytest.approx(theirs, rel=0.01)


@pytest.mark.parametrize(
    ("sigma", "rate", "steps", "rounds"),
    [
        pytest.param(0.7831, 1 / 7, 7, 2, id="simulated-digits-dp"),
        pytest.param(1.785888671875, 0.2, 5, 30, id="digits-dp-30-rounds"),
    ],
)
def test_pld_epsilon_is_within_one_percent_above_a_lower_bound(sigma, rate, steps, rounds):
    """dp-accounting's optimistic PLD (every loss rounded down: privacy buckets) bounds the
    exact epsilon from below; confide's pessimistic PLD must lie above it, and close."""
    optimistic = pld.from_gaussian_mechanism(
        sigma,
        sampling_prob=rate,
        pessimistic_estimate=False,
        use_connect_dots=False,
        value_discretization_interval=REFERENCE_INTERVAL,
    )
    floor = optimistic.self_compose(steps * rounds).get_epsilon_for_delta(1e-5)
    ours = epsilon([(sigma, rate, steps)] * rounds, 1e-5, "pld")
    assert floor <= ours <= 1.01 * floor


def test_the_ledgers_pld_spend_over_three_jobs_matches_dp_accounting(tmp_path):
    ledger = Ledger(tmp_path).open()
    jobs = [(1.1, 0.2, 5, 4), (0.9, 0.1, 10, 3), (2.0, 0.05, 20, 2)]
    for run, (sigma, rate, steps, rounds) in enumerate(jobs):
        for server_round in range(1, rounds + 1):
            ledger.record(
                Spend("default", "sha256:x", "job", str(run), server_round, 100, rate, sigma,
                      steps, 1e-5, "pld")
            )  # fmt: skip
    per_job = [(sigma, rate, steps * rounds) for sigma, rate, steps, rounds in jobs]
    (spent,) = ledger.spent(1e-5, "pld")
    assert (spent.accountant, spent.rounds, spent.jobs) == ("pld", 9, 3)
    assert spent.epsilon == pytest.approx(dp_accounting_pld_epsilon(per_job, 1e-5), rel=0.01)
    (rdp,) = ledger.spent(1e-5)
    assert rdp.accountant == "rdp" and spent.epsilon < rdp.epsilon


def test_integer_orders_give_the_same_rdp_curve_in_both_libraries():
    orders = [float(a) for a in range(2, 64)]
    accountant = RdpAccountant(orders=orders)
    event = dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.0))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, 50))
    ours = opacus_rdp.compute_rdp(q=0.2, noise_multiplier=1.0, steps=50, orders=orders)
    theirs = accountant.get_epsilon(1e-5)
    assert opacus_rdp.get_privacy_spent(orders=orders, rdp=ours, delta=1e-5)[0] == pytest.approx(
        theirs, rel=1e-9
    )


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 5), (2.0, 20), (0.8, 3), (5.0, 100)])
def test_central_epsilon_matches_the_gaussian_mechanisms_closed_form_rdp(sigma, rounds):
    # Without sampling, one round is the Gaussian mechanism: RDP(alpha) = alpha / (2 sigma^2).
    config = CentralPrivacyConfig(enabled=True, noise_multiplier=sigma, delta=1e-5)
    orders = RDP_ORDERS + [float(a) for a in range(64, 257)]
    rdp = [rounds * alpha / (2 * sigma**2) for alpha in orders]
    expected, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert central_epsilon(config, [4] * rounds) == pytest.approx(expected, rel=0.01)
