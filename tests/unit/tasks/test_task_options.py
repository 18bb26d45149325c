"""`task.options` (an installed task's own settings) and `task.fix_model`: what they accept, and
that every form a job takes (dump, JSON, TOML, a round's flat instructions) keeps them for an
installed task and leaves them out where a built-in task reads none."""

from __future__ import annotations

import tomllib

import pytest
import tomli_w
from flwr.app import ConfigRecord
from pydantic import ValidationError

from confide.privacy.instructions import RoundInstructions
from confide.tasks.config import TaskConfig

OPTIONS = {
    "samples": 300,
    "noise": 0.25,
    "augment": True,
    "site": "north",
    "widths": [16, 32],
    "weights": [0.5, 1.5],
    "classes": ["a", "b"],
}


@pytest.fixture
def own_task(task_packages) -> str:
    """An installed task named `own-task`; its name."""
    module = task_packages.module(
        """
        from confide.tasks.registry import Task

        def load(config, seed):
            raise AssertionError("not loaded in these tests")

        TASK = Task(name="own-task", description="reads options", loader=load)
        """
    )
    task_packages.install("own-tasks", "1.0", {"own-task": f"{module}:TASK"})
    return "own-task"


def test_an_installed_task_keeps_its_options_in_every_dump(own_task):
    config = TaskConfig(name=own_task, options=OPTIONS)

    assert config.model_dump()["options"] == OPTIONS
    assert TaskConfig.model_validate_json(config.model_dump_json()) == config
    assert TaskConfig.model_validate(config.model_dump()) == config


def test_options_keep_their_types_through_toml(own_task):
    config = TaskConfig(name=own_task, options=OPTIONS)

    text = tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))
    again = TaskConfig.model_validate(tomllib.loads(text))

    assert again.options == OPTIONS
    assert type(again.options["augment"]) is bool
    assert type(again.options["samples"]) is int
    assert type(again.options["noise"]) is float


def test_options_travel_in_a_round_s_flat_instructions(own_task):
    instructions = RoundInstructions(task=TaskConfig(name=own_task, options=OPTIONS))

    flat = instructions.to_config()
    received = RoundInstructions.from_config(dict(ConfigRecord(flat)))

    assert flat["confide.task.options.widths"] == [16, 32]
    assert received.task.options == OPTIONS


def test_a_built_in_task_refuses_options_and_its_dump_has_none():
    with pytest.raises(ValidationError, match=r"task 'digits' reads no options \(samples\)"):
        TaskConfig(name="digits", options={"samples": 3})

    dumped = TaskConfig(name="digits").model_dump()

    assert "options" not in dumped
    assert "fix_model" not in dumped


def test_fix_model_is_written_only_when_chosen_for_any_task(own_task):
    assert TaskConfig(name="digits", fix_model=True).model_dump()["fix_model"] is True
    assert TaskConfig(name=own_task, fix_model=True).model_dump()["fix_model"] is True
    assert "fix_model" not in TaskConfig(name=own_task).model_dump()
    assert "options" not in TaskConfig(name=own_task).model_dump()


@pytest.mark.parametrize(
    "options",
    [
        {"nested": {"a": 1}},
        {"mixed": [1, "a"]},
        {"none": None},
        {"deep": [[1, 2]]},
    ],
)
def test_options_hold_only_scalars_and_lists_of_one_type(own_task, options):
    with pytest.raises(ValidationError):
        TaskConfig(name=own_task, options=options)


@pytest.mark.parametrize("name", ["", "with.dot", "with space", "1starts-with-a-digit"])
def test_option_names_are_plain_keys(own_task, name):
    with pytest.raises(ValidationError, match="option names"):
        TaskConfig(name=own_task, options={name: 1})
