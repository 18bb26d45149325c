"""A run's privacy report (`privacy.json`): what is protected, at what (epsilon, delta), by
which accountant, with every parameter needed to recompute each number.

Two units, never mixed:

- sample level (DP-SGD at each institution): neighbouring datasets differ by adding or
  removing one training example at one institution (add-remove), with the institution's
  declared size, which fixes every parameter of the mechanism, the same for both. Per
  institution: this run's epsilon at the job's delta with the job's accountant, recomputable
  from (noise_multiplier, sample_rate, steps); and, from its own ledger, its dataset's
  cumulative epsilon over every job so far (its own accountant, at its own delta).
- institution level (central DP at the coordinator, when on): neighbouring federations
  differ in all the data of one institution. Recomputable from (noise_multiplier, the
  number of institutions asked in each released round, delta): each round is one Gaussian
  mechanism, composed under RDP without sampling amplification.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from confide.privacy.config import CentralPrivacyConfig, PrivacyConfig, TrainConfig

SAMPLE_UNIT = "one training example (record) at one institution"
INSTITUTION_UNIT = "all the data of one institution (its whole contribution)"
SAMPLE_NEIGHBOURING = "add-remove"
SAMPLE_NEIGHBOURING_DETAIL = (
    "neighbouring datasets differ by adding or removing one training example at one "
    "institution; the institution's declared size, and so every parameter of the mechanism, "
    "is the same for both"
)
# What each institution publishes on purpose (confide.privacy.mechanism).
PUBLISHED = [
    "its declared size N (institution.toml: declared_examples, by default the training count "
    "at join rounded to two significant figures; in simulation the partition's training size "
    "rounded the same way unless simulation.declared_examples says otherwise): the sampling rate "
    "q = 1/ceil(N/B), the steps per round, sigma and the divisor follow from it, and it is "
    "the update's FedAvg weight (num-examples)",
    "that it took part in a round, and the noise generator it used",
    "its dataset's cumulative epsilon, delta and accountant from its ledger (dataset_epsilon)",
    "with federated evaluation: its validation size and metrics (not differentially private)",
]
SAMPLE_ACCOUNTANTS = {
    "rdp": "RDP (Opacus RDPAccountant; Mironov et al. 2019, conversion of Balle et al. 2020)",
    "prv": "PRV (Opacus PRVAccountant; Gopi et al. 2021)",
    "pld": "PLD (Google dp-accounting PLDAccountant, pessimistic; Koskela et al. 2020, "
    "Doroshenko et al. 2022)",
}
INSTITUTION_ACCOUNTANT = "RDP (Flower RdpAccountant over Google dp-accounting)"
# Where an institution's DP-SGD noise came from, as its train replies say.
NOISE_GENERATORS = {
    "os-csprng": "the operating system's CSPRNG (os.urandom) for every noise value",
    "torch-os-seeded": "PyTorch's default generator (Mersenne Twister, not a cryptographic "
    "generator), seeded each round with 63 bits from the operating system's CSPRNG",
    "torch-scenario-seeded": "PyTorch's default generator (Mersenne Twister), seeded from the "
    "scenario seed and the ledger's position (reproducible; simulation only)",
}
CENTRAL_NOISE = {
    True: "NumPy's PCG64 generator seeded from the scenario seed (reproducible; simulation only)",
    False: "NumPy's PCG64 generator (not a cryptographic generator) seeded with 128 bits from "
    "the operating system's CSPRNG",
}
NOT_PROTECTED = [
    "that an institution took part, and its declared size (published on purpose: the "
    "mechanism's parameters and the update's weight follow from it)",
    "each institution's validation metrics and validation size (federated evaluation is not "
    "differentially private)",
    "anything outside the model updates: the coordinator's own test data, logs, timing",
    "data an institution trained on without DP (its ledger then shows an unbounded epsilon)",
]


def noise_generator(source: str, seed: int | None) -> str:
    """The NOISE_GENERATORS key of a round trained with `source` ("csprng" or "torch") and
    the ClientApp's `noise_seed` (None: drawn from the OS CSPRNG each round)."""
    if source == "csprng":
        return "os-csprng"
    return "torch-os-seeded" if seed is None else "torch-scenario-seeded"


def json_epsilon(value: float | str | None) -> float | str | None:
    """JSON has no infinity: an unbounded epsilon is written as the string 'unbounded'."""
    if isinstance(value, float) and math.isinf(value):
        return "unbounded"
    return value


def _noise_sentence(generators: list[str]) -> str:
    if not generators:
        return "No institution reported its noise generator."
    described = "; ".join(
        f"{NOISE_GENERATORS.get(key, key)} ({count} institution{'s' * (count != 1)})"
        for key, count in sorted(Counter(generators).items())
    )
    return f"DP-SGD noise, as the institutions report it: {described}."


def statement(
    privacy: PrivacyConfig,
    central: CentralPrivacyConfig,
    epsilon_max: float,
    central_epsilon: float | None,
    *,
    generators: list[str],
    simulated: bool,
) -> str:
    """The report's plain-language paragraph; `generators` are the institutions' noise
    generators (NOISE_GENERATORS keys)."""
    parts = []
    if privacy.enabled:
        accountant = privacy.accountant.upper()
        parts.append(
            "Sample level: each institution trained with DP-SGD, so the model updates it sent "
            f"in this run are (epsilon <= {epsilon_max:.3f}, delta = {privacy.delta:g})-"
            f"differentially private ({accountant} accountant) with respect to adding or "
            "removing one training example of its data: that change alters the probability "
            f"of anything computed from the updates by at most a factor of "
            f"e^{epsilon_max:.3f}, except with probability {privacy.delta:g}. The sampling "
            "rate, steps, noise and weights follow from each institution's declared size, "
            "which is public, not from its data. Each institution's ledger composes this with "
            "every earlier job on the same data (dataset_epsilon)."
        )
        parts.append(_noise_sentence(generators))
    else:
        parts.append(
            "No sample-level DP: the institutions' model updates carry no (epsilon, delta) "
            "guarantee for individual records."
        )
    if central.enabled and central_epsilon is not None:
        parts.append(
            "Institution level: the coordinator clipped each institution's update and added "
            f"Gaussian noise ({CENTRAL_NOISE[simulated]}), so the sequence of global models "
            f"is (epsilon = {central_epsilon:.3f}, delta = {central.delta:g})-differentially "
            "private with respect to replacing everything one institution contributed by "
            "nothing (RDP accountant, no sampling amplification); which institutions took "
            "part is not hidden. This protects against everyone who sees the global models, "
            "not against the coordinator, which sees each update before the noise."
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
    generators = [row["noise_generator"] for row in institutions if row.get("noise_generator")]
    sample: dict[str, Any] = {"enabled": privacy.enabled, "unit": SAMPLE_UNIT}
    if privacy.enabled:
        sample |= {
            "neighbouring": SAMPLE_NEIGHBOURING,
            "neighbouring_detail": SAMPLE_NEIGHBOURING_DETAIL,
            "published": PUBLISHED,
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
            "declared_examples": row["declared_examples"],
            "rounds_trained": row["rounds_trained"],
            "epsilon": row["epsilon"],
            "delta": row["delta"],
            "noise_multiplier": row["noise_multiplier"],
            "sample_rate": row["sample_rate"],
            "steps": row["steps"],
            "noise_generator": row.get("noise_generator"),
            "dataset_epsilon": json_epsilon(row.get("dataset_epsilon")),
            "dataset_delta": row.get("dataset_delta"),
            "dataset_accountant": row.get("dataset_accountant"),
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
            "neighbouring": "zero-out",
            "neighbouring_detail": "one institution's contribution replaced by none; which "
            "institutions took part is public",
            "noise_generator": CENTRAL_NOISE[simulated],
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
        "statement": statement(
            privacy,
            central,
            epsilon_max,
            central_epsilon,
            generators=generators,
            simulated=simulated,
        ),
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
