"""Institution-level differential privacy at the coordinator (central DP), as a wrapper
around an aggregation rule (`confide.server.aggregation`), the way Flower's
`DifferentialPrivacyServerSideFixedClipping` wraps a strategy.

Round t asks n_t institutions to train (n_t is fixed when the messages leave, before any
reply). With w_t the global model and w_i the model institution i returns, the wrapper clips
each change, lets the wrapped rule combine the clipped changes in its central form
(`central_sum`: a total and a public divisor D_t), and adds noise calibrated to the rule's
sensitivity s_t = `sensitivity(n_t)` (in units of C) from public values only (sigma, C, s_t):

    d_i     = clip(w_i - w_t, C)            scaled to L2 norm <= C (Flower's FlatClip)
    w_{t+1} = w_t + (total(d) + N(0, (sigma s_t C)^2 I)) / D_t

The order is clip -> rule -> noise: the rule sees clipped changes only, so what it releases
has a bounded sensitivity whatever the institutions send. Per rule:

- fedavg: total = sum_{i replied} d_i, D_t = n_t, s = 1 (the fixed-denominator mean).
  Replacing one institution's update by nothing changes the sum by at most C, so each round
  is the Gaussian mechanism with noise multiplier sigma whoever replies; a refusing or
  failing institution adds nothing, the divisor stays n_t (dividing by the number of replies
  would raise the sensitivity), and a round in which nobody's update was accepted is still
  released with noise. Updates are not weighted by example counts: a weight would let one
  institution move the average by more than C / n_t.
- a robust rule (median, trimmed-mean, krum, multi-krum, bulyan): total = the rule's
  statistic of the clipped changes (zero for fewer than the rule needs, none included),
  D_t = 1, s = 2B with ||statistic|| <= B C for any clipped changes (`RobustRule`): B below
  sqrt 2 for the median, at most 1 / sqrt(1 - beta) for the trimmed mean, 1 for krum and
  multi-krum, at most sqrt 2 for bulyan. The noise on the model is then
  sigma 2B C, against fedavg's sigma C / n_t: about 2B n_t times more for the same sigma and
  epsilon (docs/privacy.md).
- any other rule: its sensitivity must be derived for that rule. A rule that states none
  (`sensitivity` None) is refused here and by the job's validation.

Which institutions were asked (and n_t) is public: the guarantee covers the content of one
institution's contribution, not whether it took part (the "zero-out" neighbouring relation).

Accounting: the releases compose under RDP in Flower's `RdpAccountant` (Google's
dp-accounting underneath; a Gaussian with noise multiplier sigma = std / sensitivity, as
under add-or-remove) and no amplification by sampling: confide samples institutions with
the job's seed, which is no secret. Why not Flower's `DifferentialPrivacyServerSideFixedClipping`
wrapper itself: it skips a round's aggregation when any reply is an error (an institution
refusing by its own budget must not stop the others) and its accounted mode requires
unmodified `FedAvg.aggregate_train`; its clipping (FlatClip over the update's global L2 norm)
is reproduced here with Flower's norm, its noise (the global NumPy generator) is not used, so
that a simulation repeats and a deployment draws noise nobody can regenerate.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord

from confide.common.seeding import derive_seed
from confide.privacy.config import CentralPrivacyConfig
from confide.server.aggregation import (
    AggregationRule,
    Arrays,
    Update,
    change_norm,
    float_arrays,
    model_change,
)

ACCOUNTANT = "rdp (Flower RdpAccountant, Google dp-accounting)"
# Keys of `CentralDP.round_metrics` in the round's train MetricRecord.
CENTRAL_EPSILON = "central-epsilon"
CENTRAL_ASKED = "central-asked"


def central_epsilon(config: CentralPrivacyConfig, releases: list[int]) -> float:
    """Cumulative institution-level epsilon at `config.delta` after rounds that asked
    `releases[t]` institutions each (0 for no releases)."""
    if not releases:
        return 0.0
    from flwr.serverapp import RdpAccountant
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )

    # Without amplification the population is bookkeeping only; it must cover every sample.
    population = max(releases)
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=config.delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    for sampled in releases:
        accountant.compose(GaussianPrivacyEvent(config.noise_multiplier, sampled, population))
    return accountant.get_epsilon(config.delta)


class CentralDP:
    """Clips institutions' changes, combines them with the wrapped rule, adds noise, and keeps
    the releases' account (an `Aggregation`, like the rule it wraps).

    `noise_seed` None draws each round's noise seed from the OS CSPRNG (deployment: nobody,
    institutions included, can regenerate and subtract it); a simulation passes its seed.
    """

    def __init__(
        self,
        config: CentralPrivacyConfig,
        rule: AggregationRule,
        noise_seed: int | None = None,
    ) -> None:
        if rule.sensitivity(1) is None:
            raise ValueError(
                f"central DP cannot wrap the {rule.name} rule: its sensitivity to one "
                "institution's update is not derived (see confide.server.central_dp)"
            )
        self.config = config
        self.rule = rule
        self.noise_seed = noise_seed
        self.releases: list[int] = []  # institutions asked, per released round
        # Told of each release as it is made, before anyone sees it (the job's checkpoint
        # charges it there: a coordinator that dies before the round is recorded must not
        # forget a release its institutions may already hold).
        self.on_release: Callable[[int], None] | None = None

    @property
    def epsilon(self) -> float:
        return central_epsilon(self.config, self.releases)

    def epsilon_after(self, sampled: int) -> float:
        """The epsilon one more round asking `sampled` institutions would bring."""
        return central_epsilon(self.config, [*self.releases, sampled])

    def refusal(self, asked: int) -> str | None:
        """Why the next round must not run (it would pass `max_epsilon`), or None."""
        limit = self.config.max_epsilon
        if limit is None:
            return None
        after = self.epsilon_after(asked)
        if after <= limit:
            return None
        return (
            f"central DP budget: the next round would bring the federation's institution-level "
            f"epsilon from {self.epsilon:.3f} to {after:.3f} (delta {self.config.delta:g}), over "
            f"central_privacy.max_epsilon {limit:g}"
        )

    def round_metrics(self) -> dict[str, int | float]:
        """The epsilon after the releases so far, and how many the last round asked."""
        return {CENTRAL_EPSILON: self.epsilon, CENTRAL_ASKED: self.releases[-1]}

    def aggregate(
        self, current: ArrayRecord, updates: Sequence[Update], *, asked: int, server_round: int
    ) -> ArrayRecord:
        """The next global model from the replies of a round that asked `asked` institutions
        (`updates` may be fewer: refusals and failures count as zero updates); released with
        noise even without any update."""
        if asked < max(1, len(updates)):
            raise ValueError(f"{len(updates)} updates from a round that asked {asked}")
        names = list(current.keys())
        base = float_arrays(current, names)
        clipped = [self._clipped(update.arrays, names, base) for update in updates]
        total, divisor = self.rule.central_sum(clipped, like=base, asked=asked)
        generator = np.random.default_rng(self._seed(server_round))
        std = self.config.noise_multiplier * self.config.clipping_norm * self.sensitivity(asked)
        arrays = {}
        for name, start, summed in zip(names, base, total, strict=True):
            dtype = current[name].numpy().dtype
            if not np.issubdtype(dtype, np.floating):
                arrays[name] = current[name]  # counters and the like: not trained, kept
                continue
            noisy = start + (summed + generator.normal(0.0, std, summed.shape)) / divisor
            arrays[name] = Array(noisy.astype(dtype))
        self.releases.append(asked)
        if self.on_release is not None:  # before the released model leaves the coordinator
            self.on_release(asked)
        return ArrayRecord(arrays)

    def sensitivity(self, asked: int) -> float:
        """The wrapped rule's sensitivity (units of C) in a round that asked `asked`."""
        sensitivity = self.rule.sensitivity(asked)
        if sensitivity is None:  # a rule whose answer changed since it was wrapped
            raise ValueError(f"the {self.rule.name} rule states no sensitivity for {asked}")
        return sensitivity

    def _clipped(self, update: ArrayRecord, names: list[str], base: Arrays) -> Arrays:
        """w_i - w_t scaled to L2 norm <= C over all arrays together (Flower's FlatClip)."""
        change = model_change(base, update, names)
        norm = change_norm(change)
        clip = self.config.clipping_norm
        scale = 1.0 if norm <= clip else clip / norm  # (an unchanged model: norm 0)
        return [scale * array for array in change]

    def _seed(self, server_round: int) -> int:
        if self.noise_seed is None:
            return secrets.randbits(128)
        return derive_seed(self.noise_seed, "central-noise", server_round, bits=63)
