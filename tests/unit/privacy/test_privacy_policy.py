"""An institution's own limits: checked before a round, with the trainer's own numbers."""

from __future__ import annotations

import pytest

from confide.privacy.accounting import epsilon
from confide.privacy.config import PrivacyConfig, TrainConfig
from confide.privacy.mechanism import Mechanism, plan_round
from confide.privacy.policy import (
    PolicyRefusal,
    PrivacyPolicy,
    check_job_delta,
    check_round,
)
from confide.privacy.trainer import train_round

TRAIN = TrainConfig(batch_size=20, lr=0.5)
PRIVACY = PrivacyConfig(noise_multiplier=1.0, delta=1e-5)


def plan(privacy: PrivacyConfig = PRIVACY, declared: int = 200, rounds: int = 5) -> Mechanism:
    return plan_round(privacy, TRAIN, declared_examples=declared, planned_rounds=rounds)


def test_projection_equals_the_epsilon_the_trainer_then_reports(small_digits, make_model):
    history = [(1.0, 0.1, 10)]
    mechanism = plan()
    projected = epsilon([*history, mechanism.history_entry], PRIVACY.delta, PRIVACY.accountant)
    result = train_round(
        make_model(),
        small_digits,
        train=TRAIN,
        privacy=PRIVACY,
        mechanism=mechanism,
        history=history,
        seed=0,
    )
    assert mechanism.noise_multiplier == result.noise_multiplier
    assert projected == pytest.approx(result.epsilon, rel=1e-12)


def test_a_round_within_the_limit_is_allowed():
    check_round(PrivacyPolicy(max_epsilon=50.0), PRIVACY, mechanism=plan(), history=[])


def test_a_round_that_would_pass_max_epsilon_is_refused_with_the_numbers():
    history = [(1.0, 0.1, 100)]
    with pytest.raises(PolicyRefusal, match=r"from \d+\.\d+ to \d+\.\d+ .* max_epsilon 2"):
        check_round(PrivacyPolicy(max_epsilon=2.0), PRIVACY, mechanism=plan(), history=history)


def test_a_target_epsilon_above_the_limit_is_refused_once_the_round_would_cross_it():
    # Target 8 over 4 rounds: round 1 spends well under 8, the last one reaches ~8.
    privacy = PrivacyConfig(target_epsilon=8.0, delta=1e-5)
    policy = PrivacyPolicy(max_epsilon=6.0)
    mechanism = plan(privacy, rounds=4)
    check_round(policy, privacy, mechanism=mechanism, history=[])
    assert epsilon([mechanism.history_entry], 1e-5) < 6.0
    assert epsilon([mechanism.history_entry] * 4, 1e-5) == pytest.approx(8.0, abs=0.05)
    with pytest.raises(PolicyRefusal):
        check_round(policy, privacy, mechanism=mechanism, history=[mechanism.history_entry] * 3)


def test_a_job_without_dp_is_refused_unless_the_institution_allows_it():
    off = PrivacyConfig(enabled=False)
    with pytest.raises(PolicyRefusal, match="requires DP-SGD"):
        check_round(PrivacyPolicy(), off, mechanism=plan(off), history=[])
    check_round(PrivacyPolicy(require_dp=False), off, mechanism=plan(off), history=[])


def test_a_larger_delta_than_the_institution_accepts_is_refused():
    loose = PrivacyConfig(noise_multiplier=1.0, delta=1e-3)
    with pytest.raises(PolicyRefusal, match=r"delta 0\.001 exceeds .* max_delta 1e-05"):
        check_round(PrivacyPolicy(), loose, mechanism=plan(loose), history=[])


def test_a_delta_not_below_one_over_the_declared_size_is_refused_by_every_institution():
    job = PrivacyConfig(noise_multiplier=1.0, delta=1e-3)
    check_job_delta(job, plan(job, declared=999))
    with pytest.raises(PolicyRefusal, match=r"delta = 0\.001 is not below 1/N = 0\.001"):
        check_job_delta(job, plan(job, declared=1000))


def test_the_limit_is_checked_on_the_datasets_whole_history_at_the_institutions_delta():
    # Two earlier jobs on the dataset; this job's own history would be empty.
    ledger = [(1.0, 0.1, 10), (1.0, 0.1, 10)]
    policy = PrivacyPolicy(max_epsilon=50.0, max_delta=1e-6)
    job = PrivacyConfig(noise_multiplier=1.0, delta=1e-7)  # smaller than the institution's: ok
    after = epsilon([*ledger, (1.0, 0.1, 10)], 1e-6)  # RDP at the institution's delta
    mechanism = plan(job)
    allowed = policy.model_copy(update={"max_epsilon": after * 1.001})
    check_round(allowed, job, mechanism=mechanism, history=ledger)
    refusing = policy.model_copy(update={"max_epsilon": after * 0.999})
    with pytest.raises(PolicyRefusal, match=rf"delta 1e-06\) from .* to {after:.3f}"):
        check_round(refusing, job, mechanism=mechanism, history=ledger)
