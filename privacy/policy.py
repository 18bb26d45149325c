"""An institution's own privacy limits, checked before every round of local training.

The coordinator proposes the mechanism (noise multiplier or target epsilon, delta, clipping);
the institution decides whether to run it. Before training it computes the epsilon this round
would bring its data to, with the same accountant, noise multiplier sigma and sampling rate q
the trainer is about to use:

    eps_after = eps_accountant(history + [(sigma, q, local_epochs * steps_per_epoch)], delta)

and refuses the round if `eps_after > max_epsilon`, if the job's delta exceeds `max_delta`,
or if the job turns DP off while the institution requires it. The limits live in the
institution's own settings file; nothing in a coordinator's message can change them.

Scope: `history` is what the institution has spent in the current job. Composition across
jobs and restarts needs a persistent ledger, which is not part of this module.
"""

from __future__ import annotations

from pydantic import Field

from confide.privacy.accounting import HistoryEntry, epsilon, sample_rate_and_steps
from confide.privacy.config import PrivacyConfig, TrainConfig
from confide.tasks.config import StrictModel

# Flower's error codes stop at 8; a refusal by policy is not a crash, so it has its own.
REFUSED_BY_POLICY = 100


class PrivacyPolicy(StrictModel):
    """Limits an institution sets for every job run on its data."""

    max_epsilon: float = Field(
        default=10.0, gt=0.0, le=1000.0, description="largest cumulative epsilon allowed"
    )
    max_delta: float = Field(default=1e-5, gt=0.0, lt=1.0, description="largest delta allowed")
    require_dp: bool = Field(default=True, description="refuse jobs that turn DP-SGD off")


class PolicyRefusal(ValueError):
    """This round would break the institution's limits; the message says which and by how much."""


def projected_epsilon(
    privacy: PrivacyConfig,
    train: TrainConfig,
    examples: int,
    history: list[HistoryEntry],
    planned_rounds: int,
) -> tuple[float, float]:
    """(epsilon after one more round, sigma that round would use) for `examples` examples."""
    from confide.privacy.trainer import planned_noise

    sigma = planned_noise(privacy, train, examples, planned_rounds)
    rate, per_epoch = sample_rate_and_steps(examples, train.batch_size)
    entry = (sigma, rate, per_epoch * train.local_epochs)
    return epsilon([*history, entry], privacy.delta, privacy.accountant), sigma


def check_round(
    policy: PrivacyPolicy,
    privacy: PrivacyConfig,
    train: TrainConfig,
    examples: int,
    history: list[HistoryEntry],
    planned_rounds: int,
) -> None:
    """Raise `PolicyRefusal` if training this round would break `policy`."""
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
    after, sigma = projected_epsilon(privacy, train, examples, history, planned_rounds)
    if after > policy.max_epsilon:
        spent = epsilon(history, privacy.delta, privacy.accountant)
        raise PolicyRefusal(
            f"this round would bring epsilon from {spent:.3f} to {after:.3f} "
            f"(sigma {sigma:.3f}, delta {privacy.delta:g}, {privacy.accountant.upper()}), "
            f"over this institution's max_epsilon {policy.max_epsilon:g}"
        )
