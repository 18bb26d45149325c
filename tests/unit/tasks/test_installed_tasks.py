"""Tasks from installed packages (entry-point group `confide.tasks`): found by name after the
built-in ones, imported once when asked for, and each kind of broken package refused with a
message naming the entry point and its distribution."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from confide.common.errors import PrivacyError, TaskError
from confide.privacy.trainer import check_model
from confide.tasks.config import TaskConfig
from confide.tasks.datasets import Dataset
from confide.tasks.registry import (
    BUILT_IN,
    Task,
    get_task,
    list_tasks,
    refused_tasks,
)

# A small but complete task: options read by the loader and the builder, a BatchNorm layer
# (so that the opt-in repair has something to do) and a metric of its own.
TASK_CODE = """
    import numpy as np
    import torch
    from torch import nn

    from confide.tasks.datasets import Dataset
    from confide.tasks.registry import Task


    def load(config, seed):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(int(config.options.get("samples", 40)), 3)).astype(np.float32)
        return Dataset(x, (x[:, 0] > 0).astype(np.int64), 2)


    def build(config, *, shape, classes, seed):
        width = int(config.options.get("width", 4))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return nn.Sequential(
                nn.Linear(shape[0], width), nn.BatchNorm1d(width), nn.Linear(width, classes)
            )


    def positive_share(logits, y, *, classes):
        return {"positive_share": float((logits.argmax(dim=1).numpy() == 1).mean())}


    TASK = Task(
        name="{name}",
        description="a test task",
        loader=load,
        builder=build,
        metrics=positive_share,
    )
"""


def _task_module(task_packages, name: str) -> str:
    return task_packages.module(TASK_CODE.replace("{name}", name))


def test_an_installed_task_is_found_by_name_with_its_distribution_and_version(task_packages):
    module = _task_module(task_packages, "tiny")
    task_packages.install("tiny-tasks", "1.2.0", {"tiny": f"{module}:TASK"})

    task = get_task("tiny")

    assert task.name == "tiny"
    assert task.source == "tiny-tasks 1.2.0"
    config = TaskConfig(name="tiny", options={"samples": 12})
    assert len(task.load(config, seed=0)) == 12
    listed = {listed.name: listed.source for listed in list_tasks()}
    assert listed["tiny"] == "tiny-tasks 1.2.0"
    assert listed["digits"] == BUILT_IN


def test_the_package_is_imported_once_and_only_when_its_task_is_asked_for(task_packages):
    module = _task_module(task_packages, "lazy")
    task_packages.install("lazy-tasks", "0.1", {"lazy": f"{module}:TASK"})

    TaskConfig(name="digits")
    get_task("digits")
    assert module not in sys.modules

    first = get_task("lazy")
    assert module in sys.modules
    assert get_task("lazy") is first


def test_a_package_installed_after_a_lookup_is_found_without_a_restart(task_packages):
    with pytest.raises(TaskError, match="unknown task 'late'"):
        get_task("late")
    module = _task_module(task_packages, "late")
    task_packages.install("late-tasks", "1.0", {"late": f"{module}:TASK"})

    assert get_task("late").source == "late-tasks 1.0"


def test_the_unknown_task_message_lists_built_in_and_installed_tasks(task_packages):
    module = _task_module(task_packages, "listed")
    task_packages.install("listed-tasks", "2.0", {"listed": f"{module}:TASK"})

    with pytest.raises(TaskError) as caught:
        get_task("no-such-task")

    message = str(caught.value)
    assert "unknown task 'no-such-task'" in message
    for name in ("digits", "breast-cancer", "csv", "npz", "synthetic"):
        assert name in message
    assert "listed (listed-tasks 2.0)" in message
    assert "confide.tasks" in message
    assert module not in sys.modules  # listing names imports nothing


def test_a_package_that_fails_to_import_is_refused_with_the_error(task_packages):
    module = task_packages.module('raise ImportError("libfoo.so.1 is missing")\n')
    task_packages.install("broken-tasks", "0.3", {"broken": f"{module}:TASK"})

    with pytest.raises(TaskError) as caught:
        get_task("broken")

    message = str(caught.value)
    assert "task 'broken'" in message
    assert f"'{module}:TASK'" in message
    assert "broken-tasks 0.3" in message
    assert "ImportError: libfoo.so.1 is missing" in message
    assert "every institution" in message
    with pytest.raises(ValidationError, match=r"libfoo\.so\.1 is missing"):
        TaskConfig(name="broken")


def test_an_entry_point_that_is_not_a_task_is_refused(task_packages):
    module = task_packages.module("def TASK(config, seed):\n    return None\n")
    task_packages.install("odd-tasks", "1.0", {"odd": f"{module}:TASK"})

    with pytest.raises(TaskError, match=r"odd-tasks 1\.0\) is a function, not a confide"):
        get_task("odd")


def test_a_task_named_otherwise_than_its_entry_point_is_refused(task_packages):
    module = _task_module(task_packages, "inner-name")
    task_packages.install("renamed-tasks", "1.0", {"outer-name": f"{module}:TASK"})

    with pytest.raises(TaskError) as caught:
        get_task("outer-name")

    assert "is a Task named 'inner-name'" in str(caught.value)
    assert "the entry point's name must be the task's name" in str(caught.value)


def test_an_installed_task_cannot_replace_a_built_in_one(task_packages):
    module = _task_module(task_packages, "digits")
    task_packages.install("impostor-tasks", "6.6.6", {"digits": f"{module}:TASK"})

    assert get_task("digits").source == BUILT_IN
    assert TaskConfig(name="digits").name == "digits"
    (refusal,) = refused_tasks()
    assert "impostor-tasks 6.6.6" in str(refusal)
    assert "'digits' is a built-in task, which an installed package cannot replace" in str(refusal)
    assert [task.source for task in list_tasks() if task.name == "digits"] == [BUILT_IN]
    assert module not in sys.modules


def test_a_name_two_distributions_declare_is_refused_naming_both(task_packages):
    first, second = _task_module(task_packages, "twin"), _task_module(task_packages, "twin")
    task_packages.install("alpha-tasks", "1.0", {"twin": f"{first}:TASK"})
    task_packages.install("beta-tasks", "2.0", {"twin": f"{second}:TASK"})

    with pytest.raises(TaskError) as caught:
        get_task("twin")

    message = str(caught.value)
    assert "declared by 2 installed distributions" in message
    assert "alpha-tasks 1.0" in message
    assert "beta-tasks 2.0" in message
    assert first not in sys.modules
    assert second not in sys.modules


def test_listing_keeps_usable_tasks_and_says_why_the_others_are_refused(task_packages):
    good = _task_module(task_packages, "good")
    bad = task_packages.module("TASK = 42\n")
    task_packages.install("mixed-tasks", "1.0", {"good": f"{good}:TASK", "bad": f"{bad}:TASK"})

    names = [task.name for task in list_tasks()]

    assert "good" in names
    assert "bad" not in names
    assert names == sorted(names)
    assert [str(error) for error in refused_tasks()] == [
        f"task 'bad' (entry point '{bad}:TASK' of mixed-tasks 1.0) is a int, not a "
        "confide.tasks.registry.Task; the entry point must name a Task instance"
    ]


# --- the installed task's model -----------------------------------------------------------------


def test_the_installed_builder_gets_the_options_and_the_input_shape(task_packages):
    module = _task_module(task_packages, "built")
    task_packages.install("built-tasks", "1.0", {"built": f"{module}:TASK"})
    config = TaskConfig(name="built", options={"width": 6})

    model = get_task("built").build_model(config, shape=(3,), classes=2, seed=0)

    assert model(torch.zeros(4, 3)).shape == (4, 2)
    assert model[0].out_features == 6


def test_with_fix_model_every_side_builds_the_same_repaired_model(task_packages):
    module = _task_module(task_packages, "repaired")
    task_packages.install("repaired-tasks", "1.0", {"repaired": f"{module}:TASK"})
    task = get_task("repaired")
    plain = task.build_model(TaskConfig(name="repaired"), shape=(3,), classes=2, seed=5)
    with pytest.raises(PrivacyError, match=r"set task\.fix_model = true"):
        check_model(plain)
    config = TaskConfig(name="repaired", fix_model=True)

    coordinator = task.build_model(config, shape=(3,), classes=2, seed=5)
    institution = task.build_model(config, shape=(3,), classes=2, seed=5)

    check_model(coordinator)
    assert isinstance(coordinator[1], nn.GroupNorm)
    assert coordinator.state_dict().keys() == institution.state_dict().keys()
    for name, value in coordinator.state_dict().items():
        assert torch.equal(value, institution.state_dict()[name]), name
    # The repair keeps the builder's initial weights (the same seed, the same model).
    assert torch.equal(coordinator[0].weight, plain[0].weight)


def test_a_builder_that_returns_no_module_is_refused_naming_the_task():
    def no_data(config: TaskConfig, seed: int) -> Dataset:
        raise AssertionError("never loaded")

    task = Task("no-model", "a list", no_data, builder=lambda config, **_: [nn.Linear(1, 1)])

    with pytest.raises(TaskError, match=r"'no-model' \(confide\): its model builder returned list"):
        task.build_model(TaskConfig(), shape=(1,), classes=2, seed=0)


def test_the_installed_task_metrics_join_the_evaluation(task_packages):
    from confide.tasks.metrics import evaluate

    module = _task_module(task_packages, "scored")
    task_packages.install("scored-tasks", "1.0", {"scored": f"{module}:TASK"})
    task = get_task("scored")
    config = TaskConfig(name="scored", fix_model=True)
    data = task.load(config, seed=1)
    model = task.build_model(config, shape=data.shape, classes=2, seed=0)

    metrics = evaluate(model, data.x, data.y, classes=2, extra=task.metrics)

    assert {"loss", "accuracy", "auroc", "positive_share"} <= set(metrics)
    assert 0.0 <= metrics["positive_share"] <= 1.0
    assert np.isfinite(list(metrics.values())).all()
