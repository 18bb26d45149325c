"""A training job as the coordinator runs it: what to learn, how, with what privacy, how long."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from confide.common.config import StrictModel
from confide.privacy.config import CentralPrivacyConfig, PrivacyConfig, TrainConfig
from confide.privacy.instructions import RoundInstructions
from confide.server.aggregation import RULES, rule_names
from confide.tasks.config import DataConfig, TaskConfig


class FederationConfig(StrictModel):
    """Rounds and institution sampling (FedAvg)."""

    rounds: int = Field(default=10, ge=1, le=100_000)
    fraction_train: float = Field(default=1.0, gt=0.0, le=1.0, description="sampled per round")
    fraction_evaluate: float = Field(
        default=1.0, ge=0.0, le=1.0, description="0 turns off federated evaluation"
    )
    min_train: int = Field(default=2, ge=1, le=1_000_000, description="fewest trainers a round")
    min_evaluate: int = Field(default=2, ge=0, le=1_000_000)
    min_available: int = Field(default=2, ge=1, le=1_000_000, description="wait for this many")
    timeout: float = Field(default=600.0, gt=0.0, le=86_400.0, description="seconds per round")


class AggregationConfig(StrictModel):
    """How the round's updates are combined (`confide.server.aggregation.RULES`)."""

    rule: str = Field(default="fedavg", description="an aggregation rule by name")

    @field_validator("rule")
    @classmethod
    def _known_rule(cls, value: str) -> str:
        if value not in RULES:
            raise ValueError(f"unknown aggregation rule {value!r}; allowed: {rule_names()}")
        return value


class JobConfig(StrictModel):
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    task: TaskConfig = TaskConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig(target_epsilon=8.0)
    central_privacy: CentralPrivacyConfig = CentralPrivacyConfig()
    federation: FederationConfig = FederationConfig()
    aggregation: AggregationConfig = AggregationConfig()

    @model_validator(mode="after")
    def _consistent_minimums(self) -> JobConfig:
        federation = self.federation
        if federation.min_train > federation.min_available:
            raise ValueError(
                f"federation.min_train ({federation.min_train}) exceeds "
                f"federation.min_available ({federation.min_available})"
            )
        return self

    @model_validator(mode="after")
    def _central_dp_knows_the_rules_sensitivity(self) -> JobConfig:
        """Central DP's noise is calibrated to the rule's sensitivity: refuse a rule that
        states none (see confide.server.central_dp)."""
        rule = RULES[self.aggregation.rule]
        if self.central_privacy.enabled and rule.central_sensitivity is None:
            supported = ", ".join(
                sorted(name for name, r in RULES.items() if r.central_sensitivity is not None)
            )
            raise ValueError(
                f"central_privacy needs an aggregation rule whose sensitivity is derived; "
                f"aggregation.rule {rule.name!r} has none (with central DP: {supported})"
            )
        return self

    def instructions(
        self, features: int | None = None, labels: list[str] | None = None, name: str = "job"
    ) -> RoundInstructions:
        """What every institution is asked to do; `features` and `labels` (the global model's
        input width and class names) are known once the coordinator has its test set."""
        # The coordinator's own file path (csv/npz tasks) is its business: send the name only.
        task = self.task
        if task.path is not None:
            task = task.model_copy(update={"path": Path(task.path.name)})
        return RoundInstructions(
            job=name,
            task=task,
            train=self.train,
            privacy=self.privacy,
            rounds=self.federation.rounds,
            seed=self.seed,
            features=features,
            labels=labels,
        )


class JobFile(JobConfig):
    """A job as written in a file: a job plus a name for its runs and results."""

    name: str = Field(default="job", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    description: str = ""

    def job(self) -> JobConfig:
        return JobConfig.model_validate(self.model_dump(include=set(JobConfig.model_fields)))
