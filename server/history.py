"""What a job produced, round by round: the coordinator's record of metrics and privacy spend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class InstitutionSpend:
    """An institution's latest cumulative sample-level privacy spend in this job."""

    institution: str
    # The size the institution declares (its update's weight); its actual count stays local.
    declared_examples: int = 0
    validation_examples: int = 0
    rounds_trained: int = 0
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


@dataclass
class RoundRecord:
    round: int
    metrics: dict[str, float]  # the global model on the coordinator's test set
    epsilon_max: float
    seconds: float
    trained: int
    federated_metrics: dict[str, float] = field(default_factory=dict)
    epsilons: dict[str, float] = field(default_factory=dict)  # of the institutions that trained
    central_epsilon: float | None = None  # institution-level, with central DP on

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]

    @property
    def loss(self) -> float:
        return self.metrics["loss"]

    @property
    def f1_macro(self) -> float:
        return self.metrics["f1_macro"]


class RoundObserver(Protocol):
    def __call__(self, record: RoundRecord, history: JobHistory) -> None: ...


@dataclass
class JobHistory:
    """Filled in by the strategy as rounds complete; read by reports and progress displays."""

    initial_metrics: dict[str, float] = field(default_factory=dict)
    rounds: list[RoundRecord] = field(default_factory=list)
    institutions: dict[str, InstitutionSpend] = field(default_factory=dict)
    rejected: list[dict[str, str | int]] = field(default_factory=list)
    stopped: str | None = None  # why the job ended before its last round, if it did
    central_releases: list[int] = field(default_factory=list)  # institutions asked, per release

    def spend(self, institution: str) -> InstitutionSpend:
        return self.institutions.setdefault(institution, InstitutionSpend(institution))

    @property
    def epsilon_max(self) -> float:
        return max((s.epsilon for s in self.institutions.values()), default=0.0)
