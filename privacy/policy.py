"""An institution's own privacy limits, checked before every round of local training.

The coordinator proposes the mechanism (noise multiplier or target epsilon, delta, clipping);
the institution decides whether to run it. Before training it computes the epsilon this round
would bring its data to, with the round's `Mechanism` (the sigma, q and step count the trainer
is about to use, all from public values: see confide.privacy.mechanism):

    eps_after = eps_accountant(history + [(sigma, q, local_epochs * batches_per_epoch)], delta)

where `history` is every DP-SGD step ever taken on the dataset (the institution's ledger,
all jobs), the accountant is the institution's (`accountant`, RDP by default) and delta is its
own `max_delta`. It refuses the round if `eps_after > max_epsilon`, if the job's delta exceeds
`max_delta` or is not below 1/N for its declared size N, or if the job turns DP off while the
institution requires it. The limits live in the institution's own settings file; nothing in a
coordinator's message can change them. Every input to the decision is public or the
institution's own history: a refusal reveals nothing about the examples of this round.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from confide.common.config import StrictModel
from confide.common.errors import PolicyRefusal
from confide.privacy.accounting import HistoryEntry, epsilon
from confide.privacy.config import PrivacyConfig
from confide.privacy.mechanism import DeltaTooLarge, Mechanism, check_delta

# Flower's error codes stop at 8; a refusal is not a crash, so it has codes of its own.
# 100: the institution's limits refuse the job (final for the job: its spend only grows).
# 101: the institution's ledger failed verification (until an operator deals with it).
# 102: the institution's runner refused the run's app: it is not confide's own ClientApp
#      (`confide.client.runner`). Final for the job, like 100: its app does not change.
# 103: the institution's runner answered this very message before (a copy delivered again,
#      `confide.client.served`): not run twice. Not final: the next round is a new message.
REFUSED_BY_POLICY = 100
LEDGER_UNUSABLE = 101
APP_REFUSED = 102
ALREADY_SERVED = 103


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
    accountant: Literal["rdp", "pld"] = Field(
        default="rdp",
        description="the accountant that composes the dataset's cumulative epsilon over every "
        "job (rdp: Renyi DP, Opacus; pld: privacy loss distributions, Google dp-accounting, "
        "tighter)",
    )


def check_round(
    policy: PrivacyPolicy,
    privacy: PrivacyConfig,
    *,
    mechanism: Mechanism,
    history: list[HistoryEntry],
) -> None:
    """Raise `PolicyRefusal` if training one round of `mechanism` would break `policy`;
    `history` is the dataset's whole ledger history. (delta < 1/N is every institution's
    check, with or without limits of its own: `check_job_delta`.)"""
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
    after = epsilon([*history, mechanism.history_entry], policy.max_delta, policy.accountant)
    if after > policy.max_epsilon:
        spent = epsilon(history, policy.max_delta, policy.accountant)
        if math.isinf(spent):
            raise PolicyRefusal(
                "this dataset was trained on without DP (its ledger holds a round with no "
                "noise): no finite epsilon holds for it any more"
            )
        raise PolicyRefusal(
            f"this round would bring the dataset's cumulative epsilon (every job, "
            f"{policy.accountant.upper()}, delta {policy.max_delta:g}) from {spent:.3f} to "
            f"{after:.3f} (sigma {mechanism.noise_multiplier:.3f}), over this institution's "
            f"max_epsilon {policy.max_epsilon:g}"
        )


def check_job_delta(privacy: PrivacyConfig, mechanism: Mechanism) -> None:
    """`PolicyRefusal` if a DP job's delta is not below 1/N for the declared size N: every
    institution checks this, whatever its own limits."""
    if not privacy.enabled:
        return
    try:
        check_delta(privacy.delta, mechanism.declared_examples)
    except DeltaTooLarge as error:
        raise PolicyRefusal(f"the job's {error}") from error
