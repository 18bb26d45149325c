"""How the command-line tools (`confide-simulate`, `confide-server`, `confide-client`) write:
their output (`output_console`), and how they refuse: one line on stderr naming what is
wrong, and exit code 2 (`fail`)."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

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
    errors.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)
