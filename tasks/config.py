"""Typed configuration of a task, its model and how its data is split among institutions."""

from __future__ import annotations

import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class StrictModel(BaseModel):
    """Base for every confide config: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`: the shape of Flower's run_config and ConfigRecord."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif value is not None:
            flat[name] = str(value) if isinstance(value, Path) else value
    return flat


def unflatten(flat: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inverse of `flatten`, keeping only keys under `prefix` (with the prefix removed)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        *parents, leaf = key[len(prefix) :].split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def describe_errors(error: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per problem: the dotted field, what is wrong, and the allowed range or values.

    Pydantic names only the bound that was broken; a user fixing a file wants both ends.
    """
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see the scenario format in README.md)"
        allowed = _allowed(model, problem["loc"])
        line = f"{location or '<top level>'}: {message}"
        if "input" in problem and problem["type"] != "extra_forbidden" and location:
            line += f" (got {problem['input']!r})"
        if allowed:
            line += f"; allowed: {allowed}"
        lines.append(line)
    return lines


def _allowed(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """The range (from ge/gt/le/lt constraints) or choices of the field at `loc`, if any."""
    field = None
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not isinstance(part, str) or fields is None or part not in fields:
            return ""
        field = fields[part]
        current = field.annotation
        for arg in typing.get_args(current):  # Optional[X] -> X
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
    if field is None:
        return ""
    low = high = ""
    for rule in field.metadata:
        if isinstance(rule, at.Ge):
            low = f"{rule.ge} <= "
        elif isinstance(rule, at.Gt):
            low = f"{rule.gt} < "
        elif isinstance(rule, at.Le):
            high = f" <= {rule.le}"
        elif isinstance(rule, at.Lt):
            high = f" < {rule.lt}"
    if low or high:
        return f"{low}value{high}"
    choices = typing.get_args(field.annotation)
    if typing.get_origin(field.annotation) is typing.Literal:
        return ", ".join(repr(c) for c in choices)
    return ""


ModelT = typing.TypeVar("ModelT", bound=BaseModel)


class ConfigFileError(ValueError):
    """A configuration file that cannot be read or is invalid; names the file and fields."""


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file, turning every way it can fail into a ConfigFileError naming it."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigFileError(f"{path}: not valid TOML: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"{path}: cannot read the file: {error}") from None


def validate_file(tree: dict[str, Any], model: type[ModelT], path: Path, what: str) -> ModelT:
    """`model` from `tree` (read from `path`), every problem listed with its allowed range."""
    try:
        return model.model_validate(tree)
    except ValidationError as error:
        lines = describe_errors(error, model)
        raise ConfigFileError(f"{path}: invalid {what}\n  " + "\n  ".join(lines)) from None
