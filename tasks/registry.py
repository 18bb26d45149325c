"""The task registry: a name maps to a dataset loader, a model builder and optional metrics.

Tasks come from two places, looked up in this order:

- built-in, registered in this module (`digits`, `csv`, ...); in code of your own, with::

      @register_task("my-task", "what it is")
      def _load(config: TaskConfig, seed: int) -> Dataset: ...

- installed: a Python package that declares, in its pyproject, an entry point of the group
  `confide.tasks` whose name is the task's name and whose object is a `Task` (an instance,
  not a factory)::

      [project.entry-points."confide.tasks"]
      my-task = "my_package:TASK"

  A job names such a task like a built-in one (`[task] name = "my-task"`); its settings go in
  `task.options`. No code travels with a job (an institution runs nothing but confide's own
  ClientApp, `confide.client.app_check`): the coordinator and every institution install the
  same version of the package. An installed task cannot replace a built-in one, and a name
  two distributions claim is refused, so a name means one task wherever it is looked up.
  Entry points are read when a name is first not found among the built-ins, and each task is
  imported once, when first asked for. The worked example is docs/examples/confide-task-example.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

from torch import nn

from confide.common.errors import TaskError
from confide.tasks import datasets
from confide.tasks.dp_fix import fix_for_dp
from confide.tasks.metrics import MetricsFn
from confide.tasks.models import build_model

if TYPE_CHECKING:
    from confide.tasks.config import TaskConfig

Loader = Callable[["TaskConfig", int], datasets.Dataset]
# Called as builder(config, shape=..., classes=..., seed=...): `config` is the job's
# TaskConfig (its `options` included), `shape` one example's shape without the batch
# dimension ((d,) for a table, (C, H, W) for images). The same seed must give the same model.
ModelBuilder = Callable[..., nn.Module]

# The entry-point group installed tasks are declared in.
ENTRY_POINT_GROUP = "confide.tasks"
BUILT_IN = "confide"


@dataclass(frozen=True)
class Task:
    """A named learning problem: how to load its data and build its model.

    `builder` None builds confide's own model (`task.model`); `metrics` adds the task's own
    metrics to every evaluation of its model (`confide.tasks.metrics.MetricsFn`). `source` is
    where the task comes from: `confide` for a built-in one, else the distribution and version
    that installed it (set by the registry, not by the package).
    """

    name: str
    description: str
    loader: Loader
    needs_path: bool = False
    builder: ModelBuilder | None = None
    metrics: MetricsFn | None = None
    source: str = BUILT_IN

    def load(self, config: TaskConfig, seed: int) -> datasets.Dataset:
        return self.loader(config, seed)

    def build_model(
        self, config: TaskConfig, *, shape: tuple[int, ...], classes: int, seed: int
    ) -> nn.Module:
        builder = self.builder if self.builder is not None else build_model
        model = builder(config, shape=shape, classes=classes, seed=seed)
        if not isinstance(model, nn.Module):
            raise TaskError(
                f"task '{self.name}' ({self.source}): its model builder returned "
                f"{type(model).__name__}, not a torch.nn.Module"
            )
        # The opt-in repair is part of building: the coordinator and every institution build
        # from the same TaskConfig, so they all get the same (repaired) architecture.
        return fix_for_dp(model, seed=seed) if config.fix_model else model


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
    """The task called `name`: a built-in one, else an installed one (TaskError if none, or
    if the installed one is refused; the message says why and what to do)."""
    if name in _TASKS:
        return _TASKS[name]
    return _INSTALLED.task(name)


def list_tasks() -> list[Task]:
    """Every usable task, built-in and installed, sorted by name (`refused_tasks` says why an
    installed one is left out)."""
    found = dict(_TASKS)
    for name in _INSTALLED.names():
        if name not in found:
            try:
                found[name] = _INSTALLED.task(name)
            except TaskError:
                continue
    return [found[name] for name in sorted(found)]


def refused_tasks() -> list[TaskError]:
    """Why each installed task that cannot be used is refused, in name order: for
    `confide-simulate list`, which shows them rather than failing on the first."""
    refused = []
    for name in sorted(_INSTALLED.names()):
        try:
            _INSTALLED.task(name)
        except TaskError as error:
            refused.append(error)
    return refused


def forget_installed_tasks() -> None:
    """Read the installed tasks again on the next lookup (after installing or removing a task
    package in a running process; tests)."""
    _INSTALLED.forget()


class _Installed:
    """The tasks of the entry-point group, found once and each imported when first asked for.

    Refusals are not cached: after the package is fixed and reinstalled, asking again retries.
    """

    def __init__(self) -> None:
        self._points: dict[str, list[EntryPoint]] | None = None
        self._tasks: dict[str, Task] = {}

    def forget(self) -> None:
        self._points, self._tasks = None, {}

    def names(self) -> list[str]:
        return sorted(self._scan(again=False))

    def task(self, name: str) -> Task:
        if name in self._tasks:
            return self._tasks[name]
        points = self._scan(again=False).get(name) or self._scan(again=True).get(name)
        if not points:
            raise TaskError(self._unknown(name))
        task = _checked(name, points)
        self._tasks[name] = task
        return task

    def _scan(self, *, again: bool) -> dict[str, list[EntryPoint]]:
        if self._points is None or again:
            points: dict[str, list[EntryPoint]] = {}
            for point in entry_points(group=ENTRY_POINT_GROUP):
                points.setdefault(point.name, []).append(point)
            self._points = points
        return self._points

    def _unknown(self, name: str) -> str:
        installed = [
            f"{found} ({', '.join(sorted({_origin(p) for p in points}))})"
            for found, points in sorted(self._scan(again=False).items())
            if found not in _TASKS
        ]
        return (
            f"unknown task '{name}' (known: {', '.join(sorted(_TASKS))}; installed: "
            f"{', '.join(installed) or 'none'}). A task of your own is a package that declares "
            f"it under the entry-point group '{ENTRY_POINT_GROUP}', installed here and at every "
            "institution"
        )


_INSTALLED = _Installed()


def _origin(point: EntryPoint) -> str:
    """The distribution that declares `point`, with its version."""
    dist = point.dist
    return "an unnamed distribution" if dist is None else f"{dist.name} {dist.version}"


def _checked(name: str, points: list[EntryPoint]) -> Task:
    """The Task entry point(s) `points` of `name` load, or TaskError saying why not."""
    origins = sorted({_origin(point) for point in points})
    if len(origins) > 1:
        raise TaskError(
            f"task '{name}' is declared by {len(origins)} installed distributions "
            f"({', '.join(origins)}); uninstall all but one, or rename an entry point"
        )
    point, origin = points[0], origins[0]
    where = f"task '{name}' (entry point '{point.value}' of {origin})"
    if name in _TASKS:
        raise TaskError(
            f"{where} is refused: '{name}' is a built-in task, which an installed package "
            "cannot replace; rename the entry point"
        )
    try:
        loaded = point.load()
    except Exception as error:  # anything the package's import raises is the package's fault
        raise TaskError(
            f"{where} cannot be imported: {type(error).__name__}: {error}. Install the "
            "package and what it needs, the same version here and at every institution"
        ) from error
    if not isinstance(loaded, Task):
        raise TaskError(
            f"{where} is a {type(loaded).__name__}, not a confide.tasks.registry.Task; the "
            "entry point must name a Task instance"
        )
    if loaded.name != name:
        raise TaskError(
            f"{where} is a Task named '{loaded.name}'; the entry point's name must be the "
            "task's name"
        )
    for field, value in (("loader", loaded.loader), ("builder", loaded.builder)):
        if value is not None and not callable(value):
            raise TaskError(f"{where}: its {field} is not callable")
    if loaded.metrics is not None and not callable(loaded.metrics):
        raise TaskError(f"{where}: its metrics is not callable")
    return replace(loaded, source=origin)


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


@register_task(
    "npz",
    "your NumPy .npz archive: X (n, d) features or (n, C, H, W) images, and labels y (n,)",
    needs_path=True,
)
def _npz(config: TaskConfig, seed: int) -> datasets.Dataset:
    assert config.path is not None
    return datasets.load_npz(config.path)


@register_task("digits-images", "scikit-learn's digits as 1x8x8 images (for a CNN)")
def _digits_images(config: TaskConfig, seed: int) -> datasets.Dataset:
    return datasets.load_digits_images()


@register_task(
    "images",
    "your folder of PNG images, one sub-folder per class (named after it)",
    needs_path=True,
)
def _images(config: TaskConfig, seed: int) -> datasets.Dataset:
    assert config.path is not None
    return datasets.load_image_folder(config.path)
