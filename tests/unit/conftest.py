"""Fixtures shared by the unit tests of several packages."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def inside_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are created inside a run; Flower reads its id from the process's identity."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class TaskPackages:
    """Installs throwaway distributions into a folder on sys.path, as pip would lay them out
    (a module and a `*.dist-info` folder with METADATA and entry_points.txt), so that
    `importlib.metadata` finds their `confide.tasks` entry points like a real package's."""

    def __init__(self, site: Path) -> None:
        self.site = site
        self.modules: list[str] = []

    def module(self, code: str) -> str:
        """A new module holding `code`; its name is unique, so no test sees another's import."""
        name = f"confide_test_tasks_{uuid.uuid4().hex[:12]}"
        (self.site / f"{name}.py").write_text(textwrap.dedent(code))
        self.modules.append(name)
        return name

    def install(self, distribution: str, version: str, entry_points: dict[str, str]) -> None:
        """A distribution declaring `entry_points` (task name -> "module:attribute")."""
        info = self.site / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n"
        )
        lines = [f"{name} = {value}" for name, value in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(["[confide.tasks]", *lines, ""]))


@pytest.fixture
def task_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TaskPackages]:
    """Throwaway task packages (see TaskPackages), seen by the registry from a clean cache."""
    from confide.tasks.registry import forget_installed_tasks

    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    packages = TaskPackages(site)
    forget_installed_tasks()
    yield packages
    forget_installed_tasks()
    for name in packages.modules:
        sys.modules.pop(name, None)
