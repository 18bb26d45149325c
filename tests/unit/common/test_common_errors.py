"""The error tree: one root, unique names, the documented hierarchy, and one refusal path in the
command-line tools."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import typer
from typer.testing import CliRunner

from confide.common import errors
from confide.common.terminal import RefusingGroup

PACKAGES = [
    "confide.common",
    "confide.tasks",
    "confide.privacy",
    "confide.client",
    "confide.server",
    "confide.simulations",
    "confide.protos",
]


def confide_modules():
    for name in PACKAGES:
        package = importlib.import_module(name)
        yield package
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            yield importlib.import_module(info.name)


def test_every_public_exception_is_defined_in_the_errors_module_under_one_root():
    defined_elsewhere = [
        f"{module.__name__}.{name}"
        for module in confide_modules()
        for name, value in vars(module).items()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == module.__name__
        and module is not errors
        and not name.startswith("_")
    ]
    assert defined_elsewhere == []
    tree = [value for value in vars(errors).values() if inspect.isclass(value)]
    tree = [value for value in tree if issubclass(value, BaseException)]
    assert all(issubclass(value, errors.ConfideError) for value in tree)
    names = [value.__name__ for value in tree]
    assert len(names) == len(set(names))


def test_the_documented_hierarchy_is_the_real_one():
    documented = {}
    stack: list[tuple[int, str]] = []
    for line in errors.__doc__.splitlines():
        words = line.replace("│", " ").replace("├──", "   ").replace("└──", "   ").split()
        if not words or not words[0].isidentifier() or not hasattr(errors, words[0]):
            continue
        depth = len(line) - len(
            line.replace("│", " ").replace("├──", "   ").replace("└──", "   ").lstrip()
        )
        while stack and stack[-1][0] >= depth:
            stack.pop()
        documented[words[0]] = stack[-1][1] if stack else None
        stack.append((depth, words[0]))
    classes = {
        name: value
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, errors.ConfideError)
    }
    assert set(documented) == set(classes)
    for name, parent in documented.items():
        confide_bases = [b.__name__ for b in classes[name].__bases__ if b.__name__ in classes]
        assert confide_bases == ([parent] if parent else []), name


def test_each_error_keeps_the_standard_base_code_catches_it_by():
    assert issubclass(errors.ConfigFileError, ValueError)
    assert issubclass(errors.LedgerTampered, RuntimeError)
    assert issubclass(errors.TooFewInstitutions, TimeoutError)


def test_a_command_that_lets_a_confide_error_through_prints_one_line_and_exits_2():
    app = typer.Typer(cls=RefusingGroup, add_completion=False)

    @app.command()
    def broken() -> None:
        raise errors.JobError("job.toml: [federation] rounds: must be at least 1")

    @app.command()
    def other() -> None:
        raise KeyError("a bug, not a refusal")

    result = CliRunner().invoke(app, ["broken"])
    assert result.exit_code == 2
    assert "error: job.toml: [federation] rounds: must be at least 1" in result.output
    assert "Traceback" not in result.output
    bug = CliRunner().invoke(app, ["other"])
    assert bug.exit_code == 1 and isinstance(bug.exception, KeyError)


@pytest.mark.parametrize(
    "cli", ["confide.server.cli", "confide.client.cli", "confide.simulations.cli"]
)
def test_every_command_line_tool_refuses_through_the_one_group(cli: str):
    app = importlib.import_module(cli).app
    assert app.info.cls is RefusingGroup
