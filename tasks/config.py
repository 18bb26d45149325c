"""Typed configuration of a task, its model and how its data is split among institutions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from confide.common.config import StrictModel

# The settings each built-in task reads besides `name` and `model`. A dump of a TaskConfig
# (a run's scenario.toml, a deployed run's job.toml) keeps only these, so that a csv task is not
# written down with a synthetic task's sizes. A task registered elsewhere keeps them all: its
# loader may read any.
TASK_SETTINGS: dict[str, frozenset[str]] = {
    "digits": frozenset(),
    "breast-cancer": frozenset(),
    "synthetic": frozenset({"samples", "features", "classes"}),
    "csv": frozenset({"path", "label_column"}),
    "npz": frozenset({"path"}),
}
_PER_TASK = frozenset().union(*TASK_SETTINGS.values())


class ModelConfig(StrictModel):
    """A multilayer perceptron; `hidden = []` gives multinomial logistic regression."""

    hidden: list[int] = Field(default=[64], description="hidden layer widths")
    activation: Literal["tanh", "relu"] = Field(
        default="tanh",
        description="tanh is bounded, which keeps DP-SGD's clipped gradients informative",
    )

    @model_validator(mode="after")
    def _positive_widths(self) -> ModelConfig:
        if any(width < 1 or width > 4096 for width in self.hidden):
            raise ValueError(f"hidden layer widths must be in 1..4096, got {self.hidden}")
        return self


class TaskConfig(StrictModel):
    """Which dataset to learn and with which model.

    `name` is a registered task (`digits`, `breast-cancer`, `synthetic`, `csv`, `npz`).
    `path` and `label_column` are for user data; `samples`, `features` and `classes` size the
    synthetic task.
    """

    name: str = "digits"
    path: Path | None = Field(default=None, description="CSV or NPZ file for user data")
    label_column: str = Field(default="label", description="CSV column holding the label")
    samples: int = Field(default=10_000, ge=10, le=10_000_000, description="synthetic only")
    features: int = Field(default=20, ge=2, le=10_000, description="synthetic only")
    classes: int = Field(default=2, ge=2, le=1000, description="synthetic only")
    model: ModelConfig = ModelConfig()

    @model_validator(mode="after")
    def _known_task(self) -> TaskConfig:
        from confide.tasks.registry import get_task  # registry imports this module

        task = get_task(self.name)
        if task.needs_path and self.path is None:
            raise ValueError(f"task '{self.name}' reads a file: set task.path")
        if self.name == "synthetic" and self.classes > 2 ** min(self.features, 20):
            raise ValueError(
                f"synthetic: {self.classes} classes need at least "
                f"{(self.classes - 1).bit_length()} features, got {self.features}"
            )
        return self

    @model_serializer(mode="wrap")
    def _only_what_the_task_reads(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Every dump (Python or JSON) leaves out the settings of other tasks (TASK_SETTINGS);
        validating the dump again gives them their defaults, which this task never reads."""
        dumped: dict[str, Any] = handler(self)
        reads = TASK_SETTINGS.get(self.name)
        if reads is None:
            return dumped
        return {key: value for key, value in dumped.items() if key in reads or key not in _PER_TASK}


def resolve_task_path(tree: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`tree` (a raw job or scenario) with a relative `task.path` taken relative to `folder`
    (the file's own folder), made absolute: the file then means the same data wherever it is
    run from, and a copy saved with a run's results names the file that was used."""
    task = tree.get("task")
    if not isinstance(task, dict) or not isinstance(task.get("path"), str | Path):
        return tree
    return tree | {"task": task | {"path": str((folder / task["path"]).resolve())}}


class PartitionConfig(StrictModel):
    """How a dataset is split among simulated institutions.

    - `iid`: a seeded shuffle cut into equal parts.
    - `dirichlet`: label skew; each class is spread over institutions with proportions drawn
      from Dirichlet(alpha). Small alpha (0.1) is very skewed, large alpha (100) near IID.
    - `shards`: pathological non-IID; examples sorted by label and cut into shards, each
      institution gets `shards_per_institution` of them (so only a few labels each).
    """

    scheme: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: float = Field(default=0.5, gt=0.0, le=1e4, description="Dirichlet concentration")
    shards_per_institution: int = Field(default=2, ge=1, le=100)
    min_examples: int = Field(
        default=10, ge=1, le=100_000, description="dirichlet: smallest institution allowed"
    )


class DataConfig(StrictModel):
    """How the task's data is split: a held-out test set, then institutions, then validation."""

    test_fraction: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="held out for the coordinator's evaluation"
    )
    validation_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="each institution's local validation split, never trained on",
    )
    partition: PartitionConfig = PartitionConfig()
