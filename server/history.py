"""What a job produced, round by round: the coordinator's record of metrics and privacy spend.

Pydantic models, mutable like the dataclasses they replaced: the strategy fills them in as
replies arrive (it assigns fields and appends to the lists). Construction is validated and
unknown keywords are refused (a dataclass refused them too); assignments are not validated, so
a field keeps the very object assigned to it and a round costs no copying. The documents
written at the end of a job (results.json, privacy.json) are built from them by
confide.server.results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from flwr.app import ArrayRecord
from pydantic import BaseModel, ConfigDict, Field


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InstitutionSpend(_Record):
    """An institution's latest cumulative sample-level privacy spend in this job."""

    institution: str
    # The size the institution declares (its update's weight); its actual count stays local.
    declared_examples: int = 0
    validation_examples: int = 0
    rounds_trained: int = 0  # rounds whose update reached the coordinator
    # Rounds of this job its ledger holds (its last report): more than rounds_trained when an
    # update was lost after the institution recorded it (a coordinator killed mid-round). None:
    # an institution that does not report it.
    rounds_recorded: int | None = None
    epsilon: float = 0.0
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0
    noise_generator: str | None = None  # as the institution reports it (report.NOISE_GENERATORS)
    # The dataset's spend over every job in the institution's ledger, with its own accountant
    # at its own delta.
    dataset_epsilon: float | None = None
    dataset_delta: float | None = None
    dataset_accountant: str | None = None
    # Its commitment to the data it trained on (privacy.ledger.Ledger.commitment), if reported.
    data_commitment: str | None = None


class RoundRecord(_Record):
    """One round as the coordinator saw it: results.json's round entry is built from it."""

    round: int
    metrics: dict[str, float]  # the global model on the coordinator's test set
    epsilon_max: float
    seconds: float
    trained: int
    federated_metrics: dict[str, float] = Field(default_factory=dict)
    epsilons: dict[str, float] = Field(default_factory=dict)  # of the institutions that trained
    central_epsilon: float | None = None  # institution-level, with central DP on
    note: str | None = None  # why the round was not an ordinary release (see rounds._note)

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]

    @property
    def loss(self) -> float:
        return self.metrics["loss"]

    @property
    def f1_macro(self) -> float:
        return self.metrics["f1_macro"]


class Resumption(_Record):
    """A job resumed from its checkpoint: the first round the new Flower run ran, and its id."""

    from_round: int
    run: str


class RoundObserver(Protocol):
    def __call__(self, record: RoundRecord, history: JobHistory) -> None: ...


@dataclass(frozen=True)
class GlobalModel:
    """The global model after a round (`round` 0: the job's starting point), with the input
    shape and class names of the coordinator's test set, which define its inputs and outputs,
    and that test set's fingerprint."""

    round: int
    arrays: ArrayRecord
    input_shape: tuple[int, ...]
    labels: list[str]
    test_set: str  # the test set's fingerprint (confide.server.model_file.fingerprint_test_set)


class JobHistory(_Record):
    """Filled in by the strategy as rounds complete; read by reports and progress displays."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    initial_metrics: dict[str, float] = Field(default_factory=dict)
    rounds: list[RoundRecord] = Field(default_factory=list)
    institutions: dict[str, InstitutionSpend] = Field(default_factory=dict)
    # {institution, round, phase, reason, refused_by}: results.json's rejected_updates
    rejected: list[dict[str, str | int]] = Field(default_factory=list)
    stopped: str | None = None  # why the job ended before its last round, if it did
    central_releases: list[int] = Field(default_factory=list)  # institutions asked, per release
    resumed: list[Resumption] = Field(default_factory=list)  # each resumption of the job
    # The global model after the last recorded round (the model file is written from it).
    model: GlobalModel | None = Field(default=None, exclude=True)

    def spend(self, institution: str) -> InstitutionSpend:
        if institution not in self.institutions:
            self.institutions[institution] = InstitutionSpend(institution=institution)
        return self.institutions[institution]

    @property
    def epsilon_max(self) -> float:
        return max((s.epsilon for s in self.institutions.values()), default=0.0)
