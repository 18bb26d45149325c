"""The task registry: a name maps to a dataset loader and a model builder.

Register a task of your own with::

    @register_task("my-task", "what it is")
    def _load(config: TaskConfig, seed: int) -> Dataset: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from confide.tasks import datasets
from confide.tasks.models import build_mlp

if TYPE_CHECKING:
    from confide.tasks.config import TaskConfig

Loader = Callable[["TaskConfig", int], datasets.Dataset]


@dataclass(frozen=True)
class Task:
    """A named learning problem: how to load its data and build its model."""

    name: str
    description: str
    loader: Loader
    needs_path: bool = False

    def load(self, config: TaskConfig, seed: int) -> datasets.Dataset:
        return self.loader(config, seed)

    def build_model(
        self, config: TaskConfig, *, features: int, classes: int, seed: int
    ) -> nn.Module:
        return build_mlp(config.model, features=features, classes=classes, seed=seed)


_TASKS: dict[str, Task] = {}


def register_task(
    name: str, description: str, *, needs_path: bool = False
) -> Callable[[Loader], Loader]:
    """Decorator adding a dataset loader to the registry under `name`."""

    def add(loader: Loader) -> Loader:
        if name in _TASKS:
            raise ValueError(f"task '{name}' is already registered")
        _TASKS[name] = Task(name, description, loader, needs_path)
        return loader

    return add


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task '{name}' (known: {', '.join(sorted(_TASKS))})") from None


def list_tasks() -> list[Task]:
    return [_TASKS[name] for name in sorted(_TASKS)]


@register_task("digits", "scikit-learn's 8x8 handwritten digits: 1,797 images, 10 classes")
def _digits(config: TaskConfig, seed: int) -> datasets.Dataset:
    return datasets.load_digits()


@register_task("breast-cancer", "Wisconsin breast cancer: 569 patients, 30 features, binary")
def _breast_cancer(config: TaskConfig, seed: int) -> datasets.Dataset:
    return datasets.load_breast_cancer()


@register_task("synthetic", "seeded generated classification data of any size (for scale)")
def _synthetic(config: TaskConfig, seed: int) -> datasets.Dataset:
    return datasets.make_synthetic(
        samples=config.samples, features=config.features, classes=config.classes, seed=seed
    )


@register_task("csv", "your CSV file: a header, numeric features, a label column", needs_path=True)
def _csv(config: TaskConfig, seed: int) -> datasets.Dataset:
    assert config.path is not None  # TaskConfig validates this
    return datasets.load_csv(config.path, config.label_column)


@register_task("npz", "your NumPy .npz archive with arrays X (n, d) and y (n,)", needs_path=True)
def _npz(config: TaskConfig, seed: int) -> datasets.Dataset:
    assert config.path is not None
    return datasets.load_npz(config.path)
