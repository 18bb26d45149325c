"""How the command-line tools (`confide-simulate`, `confide-server`, `confide-client`) refuse:
one line on stderr naming what is wrong, and exit code 2."""

from __future__ import annotations

import typer
from rich.console import Console

errors = Console(stderr=True)


def fail(message: str) -> typer.Exit:
    """Print `message` as an error; the caller raises the returned Exit (`raise fail(...)`)."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)
