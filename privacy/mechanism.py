"""One round's DP-SGD mechanism, from public values only.

Differential privacy hides one training example only if nothing the mechanism does depends on
that example except through the clipped, noised gradient sum. The sampling rate, the number
of steps, the noise multiplier, the divisor of the noisy sum and the weight the update carries
at the coordinator are therefore functions of the job's settings and of one number the
institution publishes on purpose — its *declared size* N — never of its private example
count n at run time:

    k       = ceil(N / B)                 Poisson batches per epoch (B: the job's batch size)
    q       = 1 / k                       each example joins each step's batch with probability q
    steps   = k * local_epochs            per round
    sigma   = the configured one, or the smallest that keeps `rounds` rounds of `steps` steps
              at rate q within the job's (target_epsilon, delta) under the job's accountant
    divisor = q * N                       the expected batch size at the declared size
    weight  = N                           the update's FedAvg weight

Each step then releases (sum over a Poisson(q) sample of clip(g_i, C) + N(0, sigma^2 C^2 I)) /
divisor, the sampled Gaussian mechanism whose privacy under the add/remove-one relation
depends on (sigma, q) alone, for any n: adding or removing one example changes the data but
none of the parameters above, which is what the accountants analyse. N only shapes utility
(the expected batch size is q * n, so a declared size far from n scales the step size); it is
published (the coordinator sees it as the update's weight) and fixed until the institution's
operator changes it. Before, these parameters were derived from n itself, so q, steps, sigma
and the divisor changed with the very example DP is meant to hide (issue 10).
"""

from __future__ import annotations

from dataclasses import dataclass

from confide.common.errors import DeltaTooLarge
from confide.privacy.config import PrivacyConfig, TrainConfig


@dataclass(frozen=True)
class Mechanism:
    """The public parameters of one round of DP-SGD (or of plain SGD when `noise_multiplier`
    is 0 and `private` is False)."""

    declared_examples: int
    local_epochs: int
    sample_rate: float
    batches_per_epoch: int
    noise_multiplier: float
    private: bool

    @property
    def steps(self) -> int:
        return self.batches_per_epoch * self.local_epochs

    @property
    def divisor(self) -> float:
        """What the noisy gradient sum is divided by: the expected batch size q * N."""
        return self.sample_rate * self.declared_examples

    @property
    def history_entry(self) -> tuple[float, float, int]:
        """(sigma, q, steps): what the accountants and the ledger record for the round."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def sampling(declared_examples: int, batch_size: int) -> tuple[float, int]:
    """(q, batches per epoch) for a declared size: q = 1 / ceil(N / B), ceil(N / B) batches.

    The same rate as Opacus's DPDataLoader would take for N examples, with the batch count
    computed in integers (Opacus's int(1 / q) can round one batch away)."""
    if declared_examples < 1:
        raise ValueError(f"the declared size must be at least 1, got {declared_examples}")
    batches = -(-declared_examples // batch_size)
    return 1.0 / batches, batches


def planned_noise(
    privacy: PrivacyConfig, train: TrainConfig, *, declared_examples: int, rounds: int
) -> float:
    """sigma: the configured one, or the smallest that meets the target over `rounds` rounds
    of `train.local_epochs` epochs at the declared size's rate (conservative under client
    sampling: it assumes the institution trains in every round). ValueError if no sigma can."""
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    from confide.privacy.accounting import noise_for_budget

    assert privacy.target_epsilon is not None  # PrivacyConfig guarantees one of the two
    rate, batches = sampling(declared_examples, train.batch_size)
    return noise_for_budget(
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        sample_rate=rate,
        steps=batches * train.local_epochs * rounds,
        accountant=privacy.accountant,
    )


def plan_round(
    privacy: PrivacyConfig, train: TrainConfig, *, declared_examples: int, planned_rounds: int
) -> Mechanism:
    """The mechanism of one round for an institution that declared `declared_examples`.

    No private value enters: two institutions with the same declared size and job run the
    same mechanism whatever data they hold."""
    rate, batches = sampling(declared_examples, train.batch_size)
    sigma = (
        planned_noise(privacy, train, declared_examples=declared_examples, rounds=planned_rounds)
        if privacy.enabled
        else 0.0
    )
    return Mechanism(
        declared_examples=declared_examples,
        local_epochs=train.local_epochs,
        sample_rate=rate,
        batches_per_epoch=batches,
        noise_multiplier=sigma,
        private=privacy.enabled,
    )


def default_declared_size(training_examples: int) -> int:
    """The size an institution declares unless its operator chooses one: its training
    examples rounded to two significant figures (1437 -> 1400, 259 -> 260, 70 -> 70), so that
    what is published says how large the data is rather than exactly how large."""
    if training_examples < 1:
        return 1
    digits = len(str(training_examples)) - 2
    return max(1, round(training_examples, -digits) if digits > 0 else training_examples)


def check_delta(delta: float, declared_examples: int) -> None:
    """Refuse delta >= 1/N: such a mechanism may publish a whole record (a "guarantee" that
    holds while one example in N is released in the clear). Checked against the declared
    size, a public value, so that the refusal itself reveals nothing private."""
    if delta >= 1.0 / declared_examples:
        raise DeltaTooLarge(
            f"delta = {delta:g} is not below 1/N = {1 / declared_examples:.3g} for a declared "
            f"size of {declared_examples} examples: with delta >= 1/N a mechanism may publish "
            "a whole record. Choose delta well below 1/N."
        )
