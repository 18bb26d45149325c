"""The task registry, TaskConfig's task checks and the models tasks build."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from confide.tasks import registry
from confide.tasks.config import ModelConfig, TaskConfig
from confide.tasks.datasets import Dataset
from confide.tasks.registry import Task, get_task, list_tasks, register_task


@pytest.fixture
def isolated_registry(monkeypatch):
    """A private copy of the registry, so tests that register tasks leave no trace."""
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))


def _linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


# --- registry ----------------------------------------------------------------------------------


def test_list_tasks_includes_the_five_builtin_tasks_sorted_by_name():
    names = [task.name for task in list_tasks()]
    assert {"digits", "breast-cancer", "synthetic", "csv", "npz"} <= set(names)
    assert names == sorted(names)
    assert all(isinstance(task, Task) and task.description for task in list_tasks())


def test_only_file_tasks_need_a_path():
    needs = {task.name: task.needs_path for task in list_tasks()}
    assert needs["csv"] is True
    assert needs["npz"] is True
    assert needs["digits"] is False
    assert needs["breast-cancer"] is False
    assert needs["synthetic"] is False


def test_get_task_returns_the_named_task():
    assert get_task("digits").name == "digits"


def test_get_task_unknown_name_raises_value_error_listing_known_tasks():
    with pytest.raises(ValueError) as caught:
        get_task("no-such-task")
    message = str(caught.value)
    assert "no-such-task" in message
    for name in ("breast-cancer", "csv", "digits", "npz", "synthetic"):
        assert name in message


def test_registering_a_duplicate_name_raises_and_keeps_the_original(isolated_registry):
    original = get_task("digits")
    with pytest.raises(ValueError, match="already registered"):

        @register_task("digits", "an impostor")
        def _impostor(config, seed):  # pragma: no cover - never called
            raise AssertionError

    assert get_task("digits") is original


def test_a_registered_task_is_listed_and_loads_through_its_loader(isolated_registry):
    data = Dataset(np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1]), 2)

    @register_task("unit-test-task", "a test task")
    def _load(config, seed):
        return data

    assert "unit-test-task" in [task.name for task in list_tasks()]
    task = get_task("unit-test-task")
    assert task.load(TaskConfig(name="unit-test-task"), 0) is data
    with pytest.raises(ValueError, match="already registered"):
        register_task("unit-test-task", "again")(_load)


# --- TaskConfig validation against the registry --------------------------------------------------


@pytest.mark.parametrize("name", ["csv", "npz"])
def test_file_task_without_path_is_refused_by_validation(name):
    with pytest.raises(ValidationError, match=r"set task\.path"):
        TaskConfig(name=name)


def test_file_task_with_a_path_is_accepted(tmp_path):
    config = TaskConfig(name="csv", path=tmp_path / "data.csv")
    assert config.path == tmp_path / "data.csv"


def test_unknown_task_name_is_refused_by_validation():
    with pytest.raises(ValidationError, match="unknown task 'nope'"):
        TaskConfig(name="nope")


def test_csv_task_loads_the_file_through_the_registry(write_csv):
    path = write_csv("x1,target,x2\n1,b,2\n3,a,4\n5,b,6\n")
    config = TaskConfig(name="csv", path=path, label_column="target")
    data = get_task("csv").load(config, seed=0)
    np.testing.assert_array_equal(data.x, [[1, 2], [3, 4], [5, 6]])
    np.testing.assert_array_equal(data.y, [1, 0, 1])


def test_npz_task_loads_the_file_through_the_registry(write_npz):
    path = write_npz(X=np.ones((3, 4)), y=np.array([0, 1, 1]))
    data = get_task("npz").load(TaskConfig(name="npz", path=path), seed=0)
    assert data.x.shape == (3, 4)
    assert data.classes == 2


def test_synthetic_task_is_sized_by_the_config_and_seeded():
    config = TaskConfig(name="synthetic", samples=120, features=6, classes=3)
    task = get_task("synthetic")
    first, again, other = task.load(config, 5), task.load(config, 5), task.load(config, 6)
    assert first.x.shape == (120, 6)
    assert first.classes == 3
    np.testing.assert_array_equal(first.x, again.x)
    assert not np.array_equal(first.x, other.x)


# --- models --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hidden", "activation"), [([64], "tanh"), ([16, 8], "relu"), ([], "tanh")]
)
def test_built_model_has_the_task_input_and_output_sizes(hidden, activation):
    config = TaskConfig(name="digits", model=ModelConfig(hidden=hidden, activation=activation))
    model = get_task("digits").build_model(config, shape=(64,), classes=10, seed=0)
    linears = _linear_layers(model)
    assert len(linears) == len(hidden) + 1
    assert linears[0].in_features == 64
    assert linears[-1].out_features == 10
    assert [layer.out_features for layer in linears[:-1]] == hidden
    expected = nn.Tanh if activation == "tanh" else nn.ReLU
    assert sum(isinstance(m, expected) for m in model.modules()) == len(hidden)
    assert model(torch.zeros(5, 64)).shape == (5, 10)


def test_binary_task_model_has_two_logits():
    config = TaskConfig(name="breast-cancer")
    model = get_task("breast-cancer").build_model(config, shape=(30,), classes=2, seed=0)
    assert model(torch.zeros(3, 30)).shape == (3, 2)


def test_same_seed_builds_identical_weights():
    config = TaskConfig(name="digits", model=ModelConfig(hidden=[8, 4]))
    task = get_task("digits")
    first = task.build_model(config, shape=(12,), classes=3, seed=42).state_dict()
    second = task.build_model(config, shape=(12,), classes=3, seed=42).state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_different_seeds_build_different_weights():
    config = TaskConfig(name="digits", model=ModelConfig(hidden=[8, 4]))
    task = get_task("digits")
    first = task.build_model(config, shape=(12,), classes=3, seed=1).state_dict()
    second = task.build_model(config, shape=(12,), classes=3, seed=2).state_dict()
    assert all(not torch.equal(first[key], second[key]) for key in first)


def test_building_a_model_does_not_disturb_the_global_torch_rng():
    torch.manual_seed(1234)
    expected = torch.rand(5)  # what the global generator yields without a build in between
    torch.manual_seed(1234)
    state_before = torch.random.get_rng_state()
    get_task("digits").build_model(TaskConfig(), shape=(64,), classes=10, seed=99)
    assert torch.equal(torch.random.get_rng_state(), state_before)
    assert torch.equal(torch.rand(5), expected)


def test_model_config_refuses_hidden_widths_out_of_range():
    with pytest.raises(ValidationError, match=r"1\.\.4096"):
        ModelConfig(hidden=[0])
    with pytest.raises(ValidationError, match=r"1\.\.4096"):
        ModelConfig(hidden=[8, 5000])
