"""Reading configuration files, shared by every package: the strict pydantic base that refuses
unknown keys, the TOML reader, and error messages that name the field and its allowed range."""

from __future__ import annotations

import tomllib
import typing
from pathlib import Path
from typing import Any

import annotated_types as at
from pydantic import BaseModel, ConfigDict, ValidationError

from confide.common.errors import ConfigFileError


class StrictModel(BaseModel):
    """Base for every confide config: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file, turning every way it can fail into a ConfigFileError naming it."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigFileError(f"{path}: not valid TOML: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"{path}: cannot read the file: {error}") from None


def validate_file(tree: dict[str, Any], model: type[ModelT], *, path: Path, what: str) -> ModelT:
    """`model` from `tree` (read from `path`), every problem listed with its allowed range."""
    try:
        return model.model_validate(tree)
    except ValidationError as error:
        lines = describe_errors(error, model)
        raise ConfigFileError(f"{path}: invalid {what}\n  " + "\n  ".join(lines)) from None
