"""An institution's own privacy limits, checked before every round of local training.

The coordinator proposes the mechanism (noise multiplier or target epsilon, delta, clipping);
the institution decides whether to run it. Before training it computes the epsilon this round
would bring its data to, with the same accountant, noise multiplier sigma and sampling rate q
the trainer is about to use:

    eps_after = eps_accountant(history + [(sigma, q, local_epochs * steps_per_epoch)], delta)

where `history` is every DP-SGD step ever taken on the dataset (the institution's ledger,
all jobs), the accountant is RDP and delta is the institution's own `max_delta`. It refuses
the round if `eps_after > max_epsilon`, if the job's delta exceeds `max_delta`, or if the job
turns DP off while the institution requires it. The limits live in the institution's own
settings file; nothing in a coordinator's message can change them.
"""

from __future__ import annotations

import math

from pydantic import Field

from confide.privacy.accounting import HistoryEntry, epsilon, sample_rate_and_steps
from confide.privacy.config import PrivacyConfig, TrainConfig
from confide.tasks.config import StrictModel

# Flower's error codes stop at 8; a refusal is not a crash, so it has codes of its own.
# 100: the institution's limits refuse the job (final for the job: its spend only grows).
# 101: the institution's ledger failed verification (until an operator deals with it).
REFUSED_BY_POLICY = 100
LEDGER_UNUSABLE = 101


class PrivacyPolicy(StrictModel):
    """Limits an institution sets for every job run on its data."""

    max_epsilon: float = Field(
        default=10.0, gt=0.0, le=1000.0, description="largest cumulative epsilon allowed"
    )
    max_delta: float = Field(
        default=1e-5,
        gt=0.0,
        lt=1.0,
        description="largest delta a job may ask; cumulative epsilon is stated at this delta",
    )
    require_dp: bool = Field(
        default=True,
        description="refuse jobs that turn DP-SGD off (a round without DP spends an "
        "unbounded epsilon: the ledger then refuses every later round on the dataset)",
    )


class PolicyRefusal(ValueError):
    """This round would break the institution's limits; the message says which and by how much."""


def round_spend(
    privacy: PrivacyConfig, train: TrainConfig, examples: int, planned_rounds: int
) -> HistoryEntry:
    """(sigma, q, steps) of one round as the trainer will run it (sigma 0 without DP)."""
    from confide.privacy.trainer import planned_noise

    rate, per_epoch = sample_rate_and_steps(examples, train.batch_size)
    if not privacy.enabled:
        return (0.0, rate, per_epoch * train.local_epochs)
    sigma = planned_noise(privacy, train, examples, planned_rounds)
    return (sigma, rate, per_epoch * train.local_epochs)


def projected_epsilon(
    privacy: PrivacyConfig,
    train: TrainConfig,
    examples: int,
    history: list[HistoryEntry],
    planned_rounds: int,
) -> tuple[float, float]:
    """(epsilon of the job's run after one more round, sigma that round would use), with the
    job's delta and accountant."""
    entry = round_spend(privacy, train, examples, planned_rounds)
    return epsilon([*history, entry], privacy.delta, privacy.accountant), entry[0]


def check_round(
    policy: PrivacyPolicy,
    privacy: PrivacyConfig,
    train: TrainConfig,
    examples: int,
    history: list[HistoryEntry],
    planned_rounds: int,
) -> None:
    """Raise `PolicyRefusal` if training this round would break `policy`; `history` is the
    dataset's whole ledger history."""
    if not privacy.enabled:
        if policy.require_dp:
            raise PolicyRefusal(
                "the job turns differential privacy off and this institution requires DP-SGD"
            )
        return
    if privacy.delta > policy.max_delta:
        raise PolicyRefusal(
            f"the job's delta {privacy.delta:g} exceeds this institution's max_delta "
            f"{policy.max_delta:g}"
        )
    entry = round_spend(privacy, train, examples, planned_rounds)
    after = epsilon([*history, entry], policy.max_delta, "rdp")
    if after > policy.max_epsilon:
        spent = epsilon(history, policy.max_delta, "rdp")
        if math.isinf(spent):
            raise PolicyRefusal(
                "this dataset was trained on without DP (its ledger holds a round with no "
                "noise): no finite epsilon holds for it any more"
            )
        raise PolicyRefusal(
            f"this round would bring the dataset's cumulative epsilon (every job, RDP, "
            f"delta {policy.max_delta:g}) from {spent:.3f} to {after:.3f} (sigma {entry[0]:.3f}), "
            f"over this institution's max_epsilon {policy.max_epsilon:g}"
        )
