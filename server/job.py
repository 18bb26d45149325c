"""A training job as the coordinator runs it: what to learn, how, with what privacy, how long."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from confide.common.config import StrictModel
from confide.privacy.config import CentralPrivacyConfig, PrivacyConfig, TrainConfig
from confide.privacy.instructions import RoundInstructions
from confide.server.aggregation import (
    DEFAULT_BYZANTINE,
    DEFAULT_TRIM_FRACTION,
    RULES,
    aggregation_rule,
    rule_names,
)
from confide.server.model_file import MODEL_NAME, VERSION_REFERENCE
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
    """How the round's updates are combined (`confide.server.aggregation.RULES`), and which
    updates the coordinator refuses first. Every parameter is accepted with every rule; a rule
    reads only its own: `trim_fraction` (trimmed-mean), `byzantine` (krum, multi-krum,
    bulyan), `keep` (multi-krum). `max_update_norm` applies whatever the rule."""

    rule: str = Field(
        default="fedavg",
        description="an aggregation rule by name: fedavg | median | trimmed-mean | krum | "
        "multi-krum | bulyan",
    )
    trim_fraction: float = Field(
        default=DEFAULT_TRIM_FRACTION,
        ge=0.0,
        lt=0.5,
        description="trimmed-mean: beta, the share of values cut at each end of every "
        "coordinate (floor(beta n) each side)",
    )
    byzantine: int = Field(
        default=DEFAULT_BYZANTINE,
        ge=0,
        le=100_000,
        description="krum, multi-krum, bulyan: f, the Byzantine institutions tolerated "
        "(needs n >= 2f + 3 updates, bulyan 4f + 3)",
    )
    keep: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="multi-krum: m, the best-scored updates averaged (default n - f)",
    )
    max_update_norm: float | None = Field(
        default=None,
        gt=0.0,
        le=1e6,
        description="refuse an update whose change from the global model has a larger L2 "
        "norm (all arrays together); none by default",
    )

    @field_validator("rule")
    @classmethod
    def _known_rule(cls, value: str) -> str:
        if value not in RULES:
            raise ValueError(f"unknown aggregation rule {value!r}; allowed: {rule_names()}")
        return value


class ModelSettings(StrictModel):
    """The model a job starts from, and the name its model is registered under.

    `init`: a registered version, `name:version` (deployment: the coordinator's registry), or
    a model file written by an earlier run (simulation: its `model.safetensors`, with its
    `model.json` beside it). Continuing a model never resets anyone's epsilon: each
    institution's ledger keeps counting, and the new model's card lists the runs it continues.
    """

    name: str | None = Field(
        default=None,
        pattern=rf"^{MODEL_NAME}$",
        description="the registry name of the model this job produces (lower case); default "
        "<task>-<model kind>",
    )
    init: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="start from a registered version (name:version) or a model file (simulation)",
    )

    def registered_init(self) -> tuple[str, int] | None:
        """(name, version) when `init` names a registered version, else None."""
        match = re.match(VERSION_REFERENCE, self.init or "")
        return (match["name"], int(match["version"])) if match else None


def model_name(job: JobConfig) -> str:
    """The registry name of the model `job` produces: `[model] name`, by default the task's
    name and its model's kind (`digits-mlp`), or the task's name for a task that builds its
    own model (an installed task package)."""
    if job.model.name is not None:
        return job.model.name
    from confide.tasks.registry import get_task

    task = job.task
    default = (
        task.name if get_task(task.name).builder is not None else f"{task.name}-{task.model.kind}"
    )
    # An installed task's name may hold what a model name may not (upper case, other marks).
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", default.lower()).strip("-._")[:64]
    return cleaned or "model"


class JobConfig(StrictModel):
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    task: TaskConfig = TaskConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig(target_epsilon=8.0)
    central_privacy: CentralPrivacyConfig = CentralPrivacyConfig()
    federation: FederationConfig = FederationConfig()
    aggregation: AggregationConfig = AggregationConfig()
    model: ModelSettings = ModelSettings()

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
    def _enough_trainers_for_the_rule(self) -> JobConfig:
        """A round aggregates at least federation.min_train updates: the rule must be defined
        for that many (Krum needs 2f + 3, Bulyan 4f + 3)."""
        rule = aggregation_rule(self.aggregation)
        if self.federation.min_train < rule.minimum_updates:
            raise ValueError(
                f"federation.min_train ({self.federation.min_train}) is below the "
                f"{rule.minimum_updates} updates a round aggregation.rule {rule.name!r} needs: "
                f"{rule.minimum_reason()}"
            )
        return self

    @model_validator(mode="after")
    def _central_dp_knows_the_rules_sensitivity(self) -> JobConfig:
        """Central DP's noise is calibrated to the rule's sensitivity: refuse a rule that
        states none (see confide.server.central_dp)."""
        rule = aggregation_rule(self.aggregation)
        if self.central_privacy.enabled and rule.sensitivity(1) is None:
            supported = ", ".join(
                sorted(name for name in RULES if aggregation_rule(name).sensitivity(1) is not None)
            )
            raise ValueError(
                f"central_privacy needs an aggregation rule whose sensitivity is derived; "
                f"aggregation.rule {rule.name!r} has none (with central DP: {supported})"
            )
        return self

    def instructions(
        self,
        features: int | None = None,
        labels: list[str] | None = None,
        name: str = "job",
        *,
        shape: tuple[int, ...] | None = None,
    ) -> RoundInstructions:
        """What every institution is asked to do; `features`, `shape` and `labels` (the global
        model's input width, one example's shape and the class names) are known once the
        coordinator has its test set; institutions refuse data of another shape."""
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
            shape=None if shape is None else list(shape),
            labels=labels,
        )


class JobFile(JobConfig):
    """A job as written in a file: a job plus a name for its runs and results."""

    name: str = Field(default="job", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    description: str = ""

    def job(self) -> JobConfig:
        return JobConfig.model_validate(self.model_dump(include=set(JobConfig.model_fields)))
