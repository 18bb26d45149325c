"""Institution-level differential privacy at the coordinator (central DP).

Round t asks n_t institutions to train (n_t is fixed when the messages leave, before any
reply). With w_t the global model and w_i the model institution i returns:

    d_i     = clip(w_i - w_t, C)            scaled to L2 norm <= C (Flower's FlatClip)
    w_{t+1} = w_t + (sum_{i replied} d_i + N(0, sigma^2 C^2 I)) / n_t

Replacing one institution's update by nothing changes the sum by at most C, so each round is
the Gaussian mechanism with noise multiplier sigma whoever replies; a refusing or failing
institution adds nothing, the divisor stays n_t (dividing by the number of replies would
raise the sensitivity), and a round in which nobody's update was accepted is still released
with noise. Which institutions were asked (and n_t) is public: the guarantee covers the
content of one institution's contribution, not whether it took part (the "zero-out"
neighbouring relation). Updates are not weighted by example counts: a weight would let one
institution move the average by more than C / n_t.

Accounting: the releases compose under RDP in Flower's `RdpAccountant` (Google's
dp-accounting underneath; a sensitivity-C Gaussian, as under add-or-remove) and no
amplification by sampling: confide samples institutions with the job's seed, which is no
secret. Why not Flower's `DifferentialPrivacyServerSideFixedClipping` wrapper itself: it
skips a round's aggregation when any reply is an error (an institution refusing by its own
budget must not stop the others) and its accounted mode requires unmodified
`FedAvg.aggregate_train`; its clipping (FlatClip over the update's global L2 norm) is
reproduced here with Flower's norm, its noise (the global NumPy generator) is not used, so
that a simulation repeats and a deployment draws noise nobody can regenerate.
"""

from __future__ import annotations

import secrets

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.supercore.differential_privacy import get_norm

from confide.common.seeding import derive_seed
from confide.privacy.config import CentralPrivacyConfig

ACCOUNTANT = "rdp (Flower RdpAccountant, Google dp-accounting)"


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
    """Clips, sums and noises institutions' updates, and keeps the releases' account.

    `noise_seed` None draws each round's noise seed from the OS CSPRNG (deployment: nobody,
    institutions included, can regenerate and subtract it); a simulation passes its seed.
    """

    def __init__(self, config: CentralPrivacyConfig, noise_seed: int | None = None) -> None:
        self.config = config
        self.noise_seed = noise_seed
        self.releases: list[int] = []  # institutions asked, per released round

    @property
    def epsilon(self) -> float:
        return central_epsilon(self.config, self.releases)

    def epsilon_after(self, sampled: int) -> float:
        """The epsilon one more round asking `sampled` institutions would bring."""
        return central_epsilon(self.config, [*self.releases, sampled])

    def over_budget(self, sampled: int) -> str | None:
        """Why the next round must not run (it would pass `max_epsilon`), or None."""
        limit = self.config.max_epsilon
        if limit is None:
            return None
        after = self.epsilon_after(sampled)
        if after <= limit:
            return None
        return (
            f"central DP budget: the next round would bring the federation's institution-level "
            f"epsilon from {self.epsilon:.3f} to {after:.3f} (delta {self.config.delta:g}), over "
            f"central_privacy.max_epsilon {limit:g}"
        )

    def aggregate(
        self, current: ArrayRecord, updates: list[ArrayRecord], sampled: int, server_round: int
    ) -> ArrayRecord:
        """The next global model from the replies of a round that asked `sampled` institutions
        (`updates` may be fewer: refusals and failures count as zero updates)."""
        if sampled < max(1, len(updates)):
            raise ValueError(f"{len(updates)} updates from a round that asked {sampled}")
        names = list(current.keys())
        base = [np.asarray(current[name].numpy(), dtype=np.float64) for name in names]
        total = [np.zeros_like(a) for a in base]
        clip = self.config.clipping_norm
        for update in updates:
            # By name, not position: a reply may list its arrays in another order.
            model = [np.asarray(update[name].numpy(), dtype=np.float64) for name in names]
            change = [after - before for after, before in zip(model, base, strict=True)]
            norm = get_norm(change)  # Flower's FlatClip: scale the whole update to norm <= C
            scale = 1.0 if norm <= clip else clip / norm  # (an unchanged model: norm 0)
            for index, array in enumerate(change):
                total[index] += scale * array
        seed = (
            secrets.randbits(128)
            if self.noise_seed is None
            else derive_seed(self.noise_seed, "central-noise", server_round, bits=63)
        )
        generator = np.random.default_rng(seed)
        std = self.config.noise_multiplier * clip
        arrays = {}
        for name, start, summed in zip(names, base, total, strict=True):
            dtype = current[name].numpy().dtype
            if not np.issubdtype(dtype, np.floating):
                arrays[name] = current[name]  # counters and the like: not trained, kept
                continue
            noisy = start + (summed + generator.normal(0.0, std, summed.shape)) / sampled
            arrays[name] = Array(noisy.astype(dtype))
        self.releases.append(sampled)
        return ArrayRecord(arrays)
