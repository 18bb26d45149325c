"""How the command-line tools (`confide-simulate`, `confide-server`, `confide-client`) write:
their output (`output_console`), and how they refuse: one line on stderr naming what is
wrong, and exit code 2 (`fail`, and `RefusingGroup` for every `ConfideError` a command lets
through)."""

from __future__ import annotations

import sys
from typing import Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from confide.common.errors import ConfideError

errors = Console(stderr=True)


def output_console() -> Console:
    """Rich on a terminal; redirected, plain text at full width (rich would otherwise cut
    tables to 80 columns and write colour codes into the file). The console writes to
    whatever `sys.stdout` is when it prints."""
    if sys.stdout.isatty():
        return Console()
    return Console(width=10_000, no_color=True, color_system=None, highlight=False, soft_wrap=True)


def fail(message: str) -> typer.Exit:
    """Print `message` as an error; the caller raises the returned Exit (`raise fail(...)`)."""
    # Escaped: messages quote files and Flower's output, where `[federation]` or `[code: 2004]`
    # would otherwise be read as markup and vanish.
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code=2)


class RefusingGroup(TyperGroup):
    """A command-line tool's top group (`typer.Typer(cls=RefusingGroup)`): a `ConfideError`
    raised by any of its commands is printed as one error line, exit code 2, with no
    traceback. Commands catch only what they must turn into another message or code.
    Catching here, not in `main()`, covers every way the group is invoked (tests' CliRunner)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfideError as error:
            raise fail(str(error)) from error
