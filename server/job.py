"""A training job as the coordinator runs it: what to learn, how, with what privacy, how long."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from confide.common.config import StrictModel
from confide.privacy.config import CentralPrivacyConfig, PrivacyConfig, TrainConfig
from confide.privacy.instructions import RoundInstructions
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


class JobConfig(StrictModel):
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    task: TaskConfig = TaskConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig(target_epsilon=8.0)
    central_privacy: CentralPrivacyConfig = CentralPrivacyConfig()
    federation: FederationConfig = FederationConfig()

    @model_validator(mode="after")
    def _consistent_minimums(self) -> JobConfig:
        federation = self.federation
        if federation.min_train > federation.min_available:
            raise ValueError(
                f"federation.min_train ({federation.min_train}) exceeds "
                f"federation.min_available ({federation.min_available})"
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
