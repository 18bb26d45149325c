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

The report is a pydantic model (`PrivacyReport`), built once at the end of a run and read back
with `PrivacyReport.model_validate_json`; its JSON Schema is docs/schemas/privacy.json.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Annotated, Final, Literal

from pydantic import BeforeValidator, ConfigDict, Field

from confide.common.config import StrictModel
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


UNBOUNDED: Final = "unbounded"


def json_epsilon(value: float | str | None) -> float | Literal["unbounded"] | None:
    """JSON has no infinity: an unbounded epsilon is written as the string 'unbounded'."""
    if isinstance(value, str):
        if value != UNBOUNDED:
            raise ValueError(f"not an epsilon: {value!r}")
        return UNBOUNDED
    if value is not None and math.isinf(value):
        return UNBOUNDED
    return value


# A ledger's cumulative epsilon, as reports hold it: an unbounded one (after training without
# DP) becomes the string "unbounded" when the report is built.
LedgerEpsilon = Annotated[float | Literal["unbounded"] | None, BeforeValidator(json_epsilon)]


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
    *,
    epsilon_max: float,
    central_epsilon: float | None,
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


class _Document(StrictModel):
    # Each attribute's docstring becomes its description in the published JSON Schema.
    model_config = ConfigDict(use_attribute_docstrings=True)


class SampleInstitution(_Document):
    """One institution's sample-level spend in this run, with what recomputes it."""

    id: int | str
    """Its index in a simulation, its name in deployment."""
    declared_examples: int | None
    """The size it declares (public): every parameter of its mechanism follows from it."""
    rounds_trained: int
    epsilon: float | None
    """This run's epsilon at `delta` (null without DP)."""
    delta: float | None
    noise_multiplier: float | None
    """sigma; with `sample_rate` and `steps`, what recomputes `epsilon`."""
    sample_rate: float | None
    steps: int
    noise_generator: str | None
    """Where its DP-SGD noise came from (a NOISE_GENERATORS key), as it reports it."""
    dataset_epsilon: LedgerEpsilon
    """Its ledger's epsilon over every job on this data ("unbounded" after training without
    DP), with its own accountant at its own delta."""
    dataset_delta: float | None
    dataset_accountant: str | None


class SampleLevelOff(_Document):
    """Sample level without DP-SGD: no guarantee, only what each institution trained."""

    enabled: Literal[False] = False
    unit: str = SAMPLE_UNIT
    institutions: list[SampleInstitution]


class SampleLevelOn(_Document):
    """Sample level with DP-SGD at each institution: the relation, mechanism and accountant."""

    enabled: Literal[True] = True
    unit: str = SAMPLE_UNIT
    neighbouring: str = SAMPLE_NEIGHBOURING
    neighbouring_detail: str = SAMPLE_NEIGHBOURING_DETAIL
    published: list[str] = PUBLISHED
    mechanism: str = (
        "DP-SGD: Poisson sampling at rate q, per-example gradient clipping to L2 norm "
        "max_grad_norm, Gaussian noise of standard deviation noise_multiplier * max_grad_norm "
        "on each step's sum"
    )
    accountant: Literal["rdp", "prv", "pld"]
    accountant_detail: str
    delta: float
    max_grad_norm: float
    target_epsilon: float | None
    batch_size: int
    local_epochs: int
    epsilon_max: float | None
    """The largest `epsilon` of any institution in this run (null if not finite: an
    institution reported an unbounded epsilon)."""
    institutions: list[SampleInstitution]


class InstitutionLevel(_Document):
    """Central DP at the coordinator: the unit is all the data of one institution."""

    unit: str = INSTITUTION_UNIT
    mechanism: str = (
        "per round, at the coordinator: each institution's change clipped to L2 norm "
        "clipping_norm; the aggregation rule applied to the clipped changes (fedavg: their "
        "sum, divided by the number of institutions asked; a robust rule: its statistic); "
        "Gaussian noise of standard deviation noise_multiplier * clipping_norm * sensitivity "
        "added to it (before fedavg's division)"
    )
    aggregation_rule: str = "fedavg"
    """The rule whose output is released (`[aggregation] rule`)."""
    sensitivity_per_round: list[float] = Field(default_factory=list)
    """Each release's L2 sensitivity in units of clipping_norm (1 for fedavg's sum; 2B for
    a robust rule whose output's norm is at most B * clipping_norm; see
    confide.server.aggregation): the noise's standard deviation divided by noise_multiplier
    * clipping_norm."""
    accountant: Literal["rdp"] = "rdp"
    accountant_detail: str = INSTITUTION_ACCOUNTANT
    neighbouring: Literal["zero-out"] = "zero-out"
    neighbouring_detail: str = (
        "one institution's contribution replaced by none; which institutions took part is public"
    )
    noise_generator: str
    sampling_amplification: bool = False
    noise_multiplier: float
    clipping_norm: float
    delta: float
    max_epsilon: float | None
    institutions_asked_per_round: list[int]
    """The institutions asked in each released round (fedavg's divisor; a robust rule's
    sensitivity depends on it): with noise_multiplier and delta, recomputes `epsilon`
    (confide.server.central_dp.central_epsilon)."""
    epsilon: float | None
    """null if not finite (no guarantee at this noise)."""


class RoundSpend(_Document):
    """The cumulative epsilons after one round."""

    round: int
    epsilon_max: float | None
    """The largest sample-level epsilon of any institution (null without DP-SGD)."""
    central_epsilon: float | None
    """The institution-level epsilon (null without central DP)."""


class PrivacyReport(_Document):
    """privacy.json: what is protected, at what (epsilon, delta), by which accountant."""

    job: str
    statement: str
    """The plain-language paragraph."""
    sample_level: Annotated[SampleLevelOff | SampleLevelOn, Field(discriminator="enabled")]
    institution_level: InstitutionLevel | None
    """Present with central DP, else null."""
    per_round: list[RoundSpend]
    stopped: str | None
    """Why the job ended before its last round, if it did."""
    not_protected: list[str]


def _sample_level(
    privacy: PrivacyConfig, train: TrainConfig, institutions: list[SampleInstitution]
) -> SampleLevelOff | SampleLevelOn:
    if not privacy.enabled:
        return SampleLevelOff(institutions=institutions)
    return SampleLevelOn(
        accountant=privacy.accountant,
        accountant_detail=SAMPLE_ACCOUNTANTS[privacy.accountant],
        delta=privacy.delta,
        max_grad_norm=privacy.max_grad_norm,
        target_epsilon=privacy.target_epsilon,
        batch_size=train.batch_size,
        local_epochs=train.local_epochs,
        epsilon_max=max((row.epsilon or 0.0 for row in institutions), default=0.0),
        institutions=institutions,
    )


def privacy_report(
    *,
    name: str,
    privacy: PrivacyConfig,
    train: TrainConfig,
    central: CentralPrivacyConfig,
    institutions: Sequence[SampleInstitution],
    rounds: Sequence[RoundSpend],
    central_releases: list[int],
    stopped: str | None,
    simulated: bool,
    central_rule: str = "fedavg",
    central_sensitivities: list[float] | None = None,
) -> PrivacyReport:
    """The privacy.json document of job `name`: `institutions` are the institutions' spends,
    `rounds` the cumulative epsilons after each round, `central_releases` the institutions
    asked in each centrally released round, `central_rule` the aggregation rule released and
    `central_sensitivities` each release's sensitivity (units of the clipping norm; by
    default 1, fedavg's)."""
    rows = list(institutions)
    sample = _sample_level(privacy, train, rows)
    central_epsilon = rounds[-1].central_epsilon if rounds and central.enabled else None
    institution_level = None
    if central.enabled:
        institution_level = InstitutionLevel(
            noise_generator=CENTRAL_NOISE[simulated],
            noise_multiplier=central.noise_multiplier,
            clipping_norm=central.clipping_norm,
            delta=central.delta,
            max_epsilon=central.max_epsilon,
            institutions_asked_per_round=central_releases,
            aggregation_rule=central_rule,
            sensitivity_per_round=(
                central_sensitivities
                if central_sensitivities is not None
                else [1.0] * len(central_releases)
            ),
            epsilon=central_epsilon if central_epsilon is not None else 0.0,
        )
    text = statement(
        privacy,
        central,
        epsilon_max=_stated(sample.epsilon_max) if isinstance(sample, SampleLevelOn) else 0.0,
        central_epsilon=central_epsilon,
        generators=[row.noise_generator for row in rows if row.noise_generator],
        simulated=simulated,
    )
    return PrivacyReport(
        job=name,
        statement=text,
        sample_level=sample,
        institution_level=institution_level,
        per_round=[
            r if privacy.enabled else r.model_copy(update={"epsilon_max": None}) for r in rounds
        ],
        stopped=stopped,
        not_protected=NOT_PROTECTED,
    )


def _stated(epsilon: float | None) -> float:
    """An epsilon as the statement prints it: None (read back from JSON's null) is unbounded."""
    return math.inf if epsilon is None else epsilon
