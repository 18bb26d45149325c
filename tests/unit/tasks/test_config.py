"""Config helpers: flatten/unflatten and readable validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from confide.common.config import StrictModel, describe_errors, flatten, unflatten
from confide.tasks.config import (
    DataConfig,
    ModelConfig,
    PartitionConfig,
    TaskConfig,
    resolve_task_path,
)


class Job(StrictModel):
    """A two-level wrapper, to check dotted paths deeper than one model."""

    task: TaskConfig = TaskConfig()
    data: DataConfig = DataConfig()


def _errors(model, raw) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(raw)
    return describe_errors(caught.value, model)


def _line_for(lines: list[str], field: str) -> str:
    matches = [line for line in lines if line.startswith(f"{field}: ")]
    assert len(matches) == 1, lines
    return matches[0]


# --- flatten / unflatten -----------------------------------------------------------------------


def test_flatten_joins_nested_keys_with_dots():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": 2.5}) == {"a.b": 1, "a.c.d": "x", "e": 2.5}


def test_flatten_drops_none_and_turns_paths_into_strings():
    flat = flatten({"task": {"path": Path("/data/x.csv"), "unused": None}})
    assert flat == {"task.path": "/data/x.csv"}


def test_unflatten_inverts_flatten():
    tree = {"seed": 3, "task": {"name": "digits", "model": {"hidden": [8, 4]}}, "x": {"y": 0.5}}
    assert unflatten(flatten(tree)) == tree


def test_unflatten_with_a_prefix_keeps_only_keys_under_it():
    flat = {"task.name": "csv", "task.model.activation": "relu", "seed": 1, "data.x": 2}
    assert unflatten(flat, "task.") == {"name": "csv", "model": {"activation": "relu"}}


def test_configs_round_trip_through_flatten_and_unflatten(tmp_path):
    job = Job(
        task=TaskConfig(
            name="csv",
            path=tmp_path / "data.csv",
            label_column="outcome",
            model=ModelConfig(hidden=[32, 16], activation="relu"),
        ),
        data=DataConfig(
            test_fraction=0.3,
            validation_fraction=0.0,
            partition=PartitionConfig(scheme="dirichlet", alpha=0.2, min_examples=5),
        ),
    )
    flat = flatten(job.model_dump())
    assert flat["task.path"] == str(tmp_path / "data.csv")
    assert flat["data.partition.alpha"] == 0.2
    assert Job.model_validate(unflatten(flat)) == job
    assert TaskConfig.model_validate(unflatten(flat, "task.")) == job.task


# --- describe_errors ---------------------------------------------------------------------------


def test_describe_errors_names_the_field_and_prints_both_ends_of_the_range():
    lines = _errors(DataConfig, {"test_fraction": 1.5})
    line = _line_for(lines, "test_fraction")
    assert "(got 1.5)" in line
    assert "allowed: 0.0 < value < 1.0" in line


def test_describe_errors_uses_dotted_paths_for_nested_fields():
    lines = _errors(DataConfig, {"partition": {"alpha": 0, "shards_per_institution": 0}})
    assert "allowed: 0.0 < value <= 10000.0" in _line_for(lines, "partition.alpha")
    assert "allowed: 1 <= value <= 100" in _line_for(lines, "partition.shards_per_institution")


def test_describe_errors_reports_three_level_paths_and_every_problem():
    lines = _errors(
        Job,
        {
            "task": {"samples": 5, "model": {"activation": "gelu"}},
            "data": {"partition": {"alpha": -1}, "validation_fraction": 1.0},
        },
    )
    assert len(lines) == 4
    assert "allowed: 10 <= value <= 10000000" in _line_for(lines, "task.samples")
    assert "(got 5)" in _line_for(lines, "task.samples")
    assert "allowed: 'tanh', 'relu'" in _line_for(lines, "task.model.activation")
    assert "allowed: 0.0 < value <= 10000.0" in _line_for(lines, "data.partition.alpha")
    assert "allowed: 0.0 <= value < 1.0" in _line_for(lines, "data.validation_fraction")


def test_describe_errors_lists_the_choices_of_a_literal_field():
    lines = _errors(PartitionConfig, {"scheme": "random"})
    line = _line_for(lines, "scheme")
    assert "(got 'random')" in line
    assert "allowed: 'iid', 'dirichlet', 'shards'" in line


@pytest.mark.parametrize(
    ("model", "raw", "field"),
    [
        (DataConfig, {"test_fracton": 0.2}, "test_fracton"),
        (DataConfig, {"partition": {"alpah": 1.0}}, "partition.alpah"),
        (Job, {"task": {"model": {"layers": [3]}}}, "task.model.layers"),
    ],
)
def test_describe_errors_reports_an_unknown_field_as_unknown(model, raw, field):
    lines = _errors(model, raw)
    line = _line_for(lines, field)
    assert "unknown field" in line
    assert "got" not in line
    assert "allowed" not in line


def test_describe_errors_reports_model_level_problems_at_top_level():
    lines = _errors(TaskConfig, {"name": "csv"})
    assert lines == ["<top level>: Value error, task 'csv' reads a file: set task.path"]


def test_describe_errors_gives_no_range_for_an_unconstrained_field():
    lines = _errors(ModelConfig, {"hidden": ["wide"]})
    line = _line_for(lines, "hidden.0")
    assert "(got 'wide')" in line
    assert "allowed" not in line


def test_configs_are_frozen():
    config = PartitionConfig()
    with pytest.raises(ValidationError):
        config.alpha = 2.0  # type: ignore[misc]


# --- what a dump of a task holds -----------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "kept"),
    [
        (TaskConfig(name="digits"), {"name", "model"}),
        (TaskConfig(name="breast-cancer"), {"name", "model"}),
        (TaskConfig(name="synthetic"), {"name", "model", "samples", "features", "classes"}),
        (TaskConfig(name="csv", path=Path("/d.csv")), {"name", "model", "path", "label_column"}),
        (TaskConfig(name="npz", path=Path("/d.npz")), {"name", "model", "path"}),
    ],
    ids=lambda value: value.name if isinstance(value, TaskConfig) else "",
)
def test_a_dump_of_a_task_holds_only_the_settings_that_task_reads(task, kept):
    assert set(task.model_dump()) == kept
    assert set(json.loads(task.model_dump_json())) == kept
    assert TaskConfig.model_validate(task.model_dump()) == task


def test_a_job_dump_drops_other_tasks_settings_inside_it_too():
    job = Job(task=TaskConfig(name="csv", path=Path("/d.csv"), samples=50))
    dumped = job.model_dump(mode="json", exclude_none=True)["task"]
    assert dumped == {
        "name": "csv",
        "path": "/d.csv",
        "label_column": "label",
        "model": {"hidden": [64], "activation": "tanh"},
    }


def test_a_task_registered_elsewhere_keeps_every_setting_in_its_dump(monkeypatch):
    from confide.tasks import registry

    own = registry.Task("test-own-task", "its loader may read any setting", lambda c, s: None)
    monkeypatch.setitem(registry._TASKS, own.name, own)  # registered for this test only
    task = TaskConfig(name="test-own-task", samples=50)
    assert task.model_dump()["samples"] == 50 and "label_column" in task.model_dump()


def test_a_relative_task_path_is_made_absolute_against_the_files_folder(tmp_path):
    tree = {"seed": 1, "task": {"name": "csv", "path": "data/x.csv"}}
    resolved = resolve_task_path(tree, tmp_path)
    assert resolved["task"]["path"] == str((tmp_path / "data" / "x.csv").resolve())
    assert tree["task"]["path"] == "data/x.csv"  # the raw tree is left as it was
    assert resolve_task_path({"task": {"path": "/abs/x.csv"}}, tmp_path)["task"]["path"] == (
        "/abs/x.csv"
    )
    assert resolve_task_path({"seed": 1}, tmp_path) == {"seed": 1}
