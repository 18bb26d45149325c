"""A run's privacy report (`privacy.json`): what is protected, at what (epsilon, delta), by
which accountant, with every parameter needed to recompute each number.

Two units, never mixed:

- sample level (DP-SGD at each institution): neighbouring datasets differ in one training
  example of one institution. Per institution: this run's epsilon at the job's delta with the
  job's accountant, recomputable from (noise_multiplier, sample_rate, steps); and, from its
  own ledger, its dataset's cumulative epsilon over every job so far (RDP, at the
  institution's delta).
- institution level (central DP at the coordinator, when on): neighbouring federations
  differ in all the data of one institution. Recomputable from (noise_multiplier, the
  number of institutions asked in each released round, delta): each round is one Gaussian
  mechanism, composed under RDP without sampling amplification.
"""

from __future__ import annotations

import math
from typing import Any

from confide.privacy.config import CentralPrivacyConfig, PrivacyConfig, TrainConfig

SAMPLE_UNIT = "one training example (record) at one institution"
INSTITUTION_UNIT = "all the data of one institution (its whole contribution)"
SAMPLE_ACCOUNTANTS = {
    "rdp": "RDP (Opacus RDPAccountant; Mironov et al. 2019, conversion of Balle et al. 2020)",
    "prv": "PRV (Opacus PRVAccountant; Gopi et al. 2021)",
}
INSTITUTION_ACCOUNTANT = "RDP (Flower RdpAccountant over Google dp-accounting)"
NOT_PROTECTED = [
    "that an institution took part, and how many examples it holds (sent with each update)",
    "each institution's validation metrics (federated evaluation is not differentially private)",
    "anything outside the model updates: the coordinator's own test data, logs, timing",
    "data an institution trained on without DP (its ledger then shows an unbounded epsilon)",
]


def json_epsilon(value: float | str | None) -> float | str | None:
    """JSON has no infinity: an unbounded epsilon is written as the string 'unbounded'."""
    if isinstance(value, float) and math.isinf(value):
        return "unbounded"
    return value


def statement(
    privacy: PrivacyConfig,
    central: CentralPrivacyConfig,
    epsilon_max: float,
    central_epsilon: float | None,
    *,
    simulated: bool,
) -> str:
    """The report's plain-language paragraph."""
    parts = []
    if privacy.enabled:
        accountant = privacy.accountant.upper()
        parts.append(
            "Sample level: each institution trained with DP-SGD, so the model updates it sent "
            f"in this run are (epsilon <= {epsilon_max:.3f}, delta = {privacy.delta:g})-"
            f"differentially private ({accountant} accountant): whether any one training "
            "example was in its data changes the probability of anything computed from them "
            f"by at most a factor of e^{epsilon_max:.3f}, except with probability "
            f"{privacy.delta:g}. Each institution's ledger composes this with every earlier "
            "job on the same data (dataset_epsilon)."
        )
        parts.append(
            "In this simulation the noise is seeded from the scenario seed for reproducibility;"
            " a deployed institution draws it from a secret source."
            if simulated
            else "Each institution drew its noise from its own secret source (OS CSPRNG)."
        )
    else:
        parts.append(
            "No sample-level DP: the institutions' model updates carry no (epsilon, delta) "
            "guarantee for individual records."
        )
    if central.enabled and central_epsilon is not None:
        parts.append(
            "Institution level: the coordinator clipped each institution's update and added "
            f"Gaussian noise, so the sequence of global models is (epsilon = "
            f"{central_epsilon:.3f}, delta = {central.delta:g})-differentially private with "
            "respect to replacing everything one institution contributed by nothing (RDP "
            "accountant, no sampling amplification); which institutions took part is not "
            "hidden. This protects against everyone who sees the global models, not against "
            "the coordinator, which sees each update before the noise."
        )
    return " ".join(parts)


def privacy_report(
    name: str,
    privacy: PrivacyConfig,
    train: TrainConfig,
    central: CentralPrivacyConfig,
    institutions: list[dict[str, Any]],
    rounds: list[dict[str, Any]],
    central_releases: list[int],
    stopped: str | None,
    *,
    simulated: bool,
) -> dict[str, Any]:
    """The privacy.json document.

    `institutions` are results.json's institution rows; `rounds` are dicts with `round`,
    `epsilon_max` and `central_epsilon`.
    """
    epsilon_max = max((row["epsilon"] or 0.0 for row in institutions), default=0.0)
    central_epsilon = rounds[-1]["central_epsilon"] if rounds and central.enabled else None
    sample: dict[str, Any] = {"enabled": privacy.enabled, "unit": SAMPLE_UNIT}
    if privacy.enabled:
        sample |= {
            "mechanism": "DP-SGD: Poisson sampling at rate q, per-example gradient clipping to "
            "L2 norm max_grad_norm, Gaussian noise of standard deviation "
            "noise_multiplier * max_grad_norm on each step's sum",
            "accountant": privacy.accountant,
            "accountant_detail": SAMPLE_ACCOUNTANTS[privacy.accountant],
            "delta": privacy.delta,
            "max_grad_norm": privacy.max_grad_norm,
            "target_epsilon": privacy.target_epsilon,
            "batch_size": train.batch_size,
            "local_epochs": train.local_epochs,
            "epsilon_max": epsilon_max,
        }
    sample["institutions"] = [
        {
            "id": row["id"],
            "examples": row["examples"],
            "rounds_trained": row["rounds_trained"],
            "epsilon": row["epsilon"],
            "delta": row["delta"],
            "noise_multiplier": row["noise_multiplier"],
            "sample_rate": row["sample_rate"],
            "steps": row["steps"],
            "dataset_epsilon": json_epsilon(row.get("dataset_epsilon")),
            "dataset_delta": row.get("dataset_delta"),
        }
        for row in institutions
    ]
    institution_level = None
    if central.enabled:
        institution_level = {
            "unit": INSTITUTION_UNIT,
            "mechanism": "per-round update clipping to L2 norm clipping_norm at the "
            "coordinator, Gaussian noise of standard deviation noise_multiplier * "
            "clipping_norm on the sum, divided by the number of institutions asked",
            "accountant": "rdp",
            "accountant_detail": INSTITUTION_ACCOUNTANT,
            "neighbouring": "one institution's contribution replaced by none (zero-out); "
            "which institutions took part is public",
            "sampling_amplification": False,
            "noise_multiplier": central.noise_multiplier,
            "clipping_norm": central.clipping_norm,
            "delta": central.delta,
            "max_epsilon": central.max_epsilon,
            "institutions_asked_per_round": central_releases,
            "epsilon": central_epsilon if central_epsilon is not None else 0.0,
        }
    return {
        "job": name,
        "statement": statement(privacy, central, epsilon_max, central_epsilon, simulated=simulated),
        "sample_level": sample,
        "institution_level": institution_level,
        "per_round": [
            {
                "round": r["round"],
                "epsilon_max": r["epsilon_max"] if privacy.enabled else None,
                "central_epsilon": r["central_epsilon"],
            }
            for r in rounds
        ],
        "stopped": stopped,
        "not_protected": NOT_PROTECTED,
    }
