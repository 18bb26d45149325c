"""Typed configuration of a task, its model and how its data is split among institutions."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from confide.common.config import StrictModel

# The settings each built-in task reads besides `name` and `model`. A dump of a TaskConfig
# (a run's scenario.toml, a deployed run's job.toml) keeps only these, so that a csv task is not
# written down with a synthetic task's sizes. A task registered elsewhere (in code, or an
# installed package's) keeps them all, `options` included: its loader may read any.
TASK_SETTINGS: dict[str, frozenset[str]] = {
    "digits": frozenset(),
    "breast-cancer": frozenset(),
    "synthetic": frozenset({"samples", "features", "classes"}),
    "csv": frozenset({"path", "label_column"}),
    "npz": frozenset({"path"}),
    "digits-images": frozenset(),
    "images": frozenset({"path"}),
}
# `options` are an installed task's own settings (see TaskConfig); built-in tasks read none.
_PER_TASK = frozenset({"options"}).union(*TASK_SETTINGS.values())
# An option's value: what TOML, JSON and a Flower ConfigRecord all hold (a list of one type).
TaskOption = bool | int | float | str | list[bool] | list[int] | list[float] | list[str]
# Option names: plain keys, because a job's settings also travel as dotted keys
# (`task.options.NAME`, confide.common.config.flatten).
_OPTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
# Built-in tasks whose examples are always flat feature vectors: a CNN is refused for them when
# the configuration is read, not once the data is loaded.
FLAT_TASKS = frozenset({"digits", "breast-cancer", "synthetic", "csv"})
# ModelConfig's settings that only a CNN reads; an MLP's dump leaves them out.
_CNN_SETTINGS = frozenset({"kind", "channels", "groups", "kernel_size", "pool", "head"})


class ModelConfig(StrictModel):
    """The model: a multilayer perceptron (`kind = "mlp"`; `hidden = []` gives multinomial
    logistic regression) or, for images (C, H, W), a small CNN (`kind = "cnn"`): blocks of
    convolution, GroupNorm, activation and (with `pool`) 2x2 max pooling, then the `hidden`
    dense layers.

    GroupNorm rather than BatchNorm: a batch statistic mixes examples, so DP-SGD (per-example
    gradients) cannot use it; GroupNorm normalises each example on its own.
    """

    kind: Literal["mlp", "cnn"] = Field(default="mlp", description="cnn needs image data")
    hidden: list[int] = Field(
        default=[64], description="dense hidden layer widths (for a cnn: after its convolutions)"
    )
    activation: Literal["tanh", "relu"] = Field(
        default="tanh",
        description="tanh is bounded, which keeps DP-SGD's clipped gradients informative",
    )
    channels: list[int] = Field(
        default=[16, 32], min_length=1, max_length=8, description="cnn: channels of each block"
    )
    groups: int = Field(
        default=4, ge=1, le=1024, description="cnn: GroupNorm groups; divides every channel count"
    )
    kernel_size: int = Field(default=3, ge=1, le=7, description="cnn: odd; padding keeps size")
    pool: bool = Field(
        default=True,
        description="cnn: 2x2 max pooling after each block while the image is at least 2x2; "
        "false keeps every pixel (small images, where pooling discards too much)",
    )
    head: Literal["flatten", "average"] = Field(
        default="flatten",
        description="cnn: flatten the last feature maps, or average each channel over the image "
        "(fewer weights for large images)",
    )

    @model_validator(mode="after")
    def _positive_widths(self) -> ModelConfig:
        if any(width < 1 or width > 4096 for width in self.hidden):
            raise ValueError(f"hidden layer widths must be in 1..4096, got {self.hidden}")
        return self

    @model_validator(mode="after")
    def _cnn_settings_only_for_a_cnn(self) -> ModelConfig:
        """A CNN setting on an MLP would be silently ignored: most likely `kind` was forgotten."""
        given = sorted((self.model_fields_set & _CNN_SETTINGS) - {"kind"})
        if self.kind == "mlp" and given:
            raise ValueError(
                f"{', '.join(given)}: only a cnn reads these; set kind = 'cnn' or remove them"
            )
        return self

    @model_validator(mode="after")
    def _valid_convolutions(self) -> ModelConfig:
        if any(width < 1 or width > 1024 for width in self.channels):
            raise ValueError(f"cnn channels must be in 1..1024, got {self.channels}")
        uneven = [width for width in self.channels if width % self.groups]
        if uneven:
            raise ValueError(
                f"cnn: GroupNorm's groups = {self.groups} must divide every channel count; "
                f"{uneven} do not (channels {self.channels})"
            )
        if self.kernel_size % 2 == 0:
            raise ValueError(
                f"cnn: kernel_size must be odd (padding keeps the image size), got "
                f"{self.kernel_size}"
            )
        return self

    @model_serializer(mode="wrap")
    def _only_what_the_kind_reads(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """An MLP's dump leaves out the CNN's settings (and its kind, the default), so that
        files written before CNNs existed read the same as those written now."""
        dumped: dict[str, Any] = handler(self)
        if self.kind == "mlp":
            return {key: value for key, value in dumped.items() if key not in _CNN_SETTINGS}
        return dumped


class TaskConfig(StrictModel):
    """Which dataset to learn and with which model.

    `name` is a registered task (`digits`, `digits-images`, `breast-cancer`, `synthetic`,
    `csv`, `npz`, `images`) or an installed one (confide.tasks.registry). `path` and
    `label_column` are for user data; `samples`, `features` and `classes` size the synthetic
    task. `options` are an installed task's own settings, which its loader and model builder
    read from this config; built-in tasks read none. `fix_model` builds the model with the
    layers DP-SGD cannot train replaced by Opacus (BatchNorm -> GroupNorm,
    confide.tasks.dp_fix): an opt-in, because it changes the architecture.
    """

    name: str = "digits"
    path: Path | None = Field(
        default=None, description="CSV or NPZ file, or folder of PNG images, for user data"
    )
    label_column: str = Field(default="label", description="CSV column holding the label")
    samples: int = Field(default=10_000, ge=10, le=10_000_000, description="synthetic only")
    features: int = Field(default=20, ge=2, le=10_000, description="synthetic only")
    classes: int = Field(default=2, ge=2, le=1000, description="synthetic only")
    model: ModelConfig = ModelConfig()
    options: dict[str, TaskOption] = Field(
        default_factory=dict, description="an installed task's own settings"
    )
    fix_model: bool = Field(
        default=False,
        description="replace layers DP-SGD cannot train (BatchNorm -> GroupNorm, Opacus)",
    )

    @model_validator(mode="after")
    def _known_task(self) -> TaskConfig:
        from confide.tasks.registry import get_task  # registry imports this module

        task = get_task(self.name)
        if self.options and self.name in TASK_SETTINGS:
            raise ValueError(
                f"task '{self.name}' reads no options ({', '.join(sorted(self.options))}); "
                "options are for an installed task"
            )
        bad = sorted(name for name in self.options if not _OPTION_NAME.fullmatch(name))
        if bad:
            raise ValueError(
                f"option names {bad}: use letters, digits, _ and - (64 at most), starting "
                "with a letter or _"
            )
        if task.needs_path and self.path is None:
            raise ValueError(f"task '{self.name}' reads a file: set task.path")
        if self.name == "synthetic" and self.classes > 2 ** min(self.features, 20):
            raise ValueError(
                f"synthetic: {self.classes} classes need at least "
                f"{(self.classes - 1).bit_length()} features, got {self.features}"
            )
        if self.model.kind == "cnn" and self.name in FLAT_TASKS:
            raise ValueError(
                f"model.kind = 'cnn' needs images (C, H, W), and task '{self.name}' gives flat "
                "feature vectors: use an image task (digits-images, images, or npz with X of "
                "shape (n, C, H, W)) or model.kind = 'mlp'"
            )
        return self

    @model_serializer(mode="wrap")
    def _only_what_the_task_reads(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Every dump (Python or JSON) leaves out the settings of other tasks (TASK_SETTINGS);
        validating the dump again gives them their defaults, which this task never reads.
        Empty `options` and `fix_model = false` are left out too, so that files written
        before they existed read the same as those written now."""
        dumped: dict[str, Any] = handler(self)
        if not self.options:
            dumped.pop("options", None)
        if not self.fix_model:
            dumped.pop("fix_model", None)
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
