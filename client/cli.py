"""`confide-client`: join a coordinator and run this institution's SuperNode."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from confide.tasks.terminal import fail

if TYPE_CHECKING:
    from confide.client.institution import InstitutionDir

app = typer.Typer(
    help="Join a confide coordinator as an institution and train on local data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
DirOption = Annotated[Path, typer.Option("--dir", help="this institution's state directory")]


def _check_data(path: Path, label_column: str) -> None:
    """Refuse unreadable data before anything is registered."""
    from confide.tasks.datasets import DatasetError, read_file

    try:
        read_file(path, label_column)
    except DatasetError as error:
        raise fail(f"--data: {error}") from None


def _token(token: str | None, token_file: Path | None) -> str:
    if (token is None) == (token_file is None):
        raise fail("give exactly one of --token and --token-file")
    if token_file is None:
        assert token is not None
        return token
    try:
        return token_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise fail(f"--token-file {token_file}: cannot read it: {error}") from None


@app.command()
def join(
    server: Annotated[str, typer.Option(help="the coordinator's enrollment service, HOST:PORT")],
    state: DirOption,
    data: Annotated[
        Path, typer.Option(help="local training data: CSV (with a label column) or NPZ")
    ],
    token: Annotated[
        str | None, typer.Option(help="the join token from `confide-server token create`")
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(help="read the token from this file instead (keeps it out of `ps`)"),
    ] = None,
    label_column: Annotated[str, typer.Option(help="CSV label column")] = "label",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    port: Annotated[int, typer.Option(help="this SuperNode's local port")] = 9094,
    max_epsilon: Annotated[
        float,
        typer.Option(help="this institution's limit: refuse any round past this epsilon"),
    ] = 10.0,
    max_delta: Annotated[float, typer.Option(help="refuse jobs asking a larger delta")] = 1e-5,
    start: Annotated[bool, typer.Option(help="start the SuperNode after joining")] = True,
) -> None:
    """Verify the coordinator by the token's CA fingerprint, register a new key, then run."""
    from confide.client.enrollment import JoinError
    from confide.client.enrollment import join as enroll
    from confide.client.institution import InstitutionConfig, InstitutionDir
    from confide.privacy.policy import PrivacyPolicy
    from confide.tasks.config import describe_errors

    token = _token(token, token_file)
    directory = InstitutionDir(state)
    try:
        policy = PrivacyPolicy(max_epsilon=max_epsilon, max_delta=max_delta)
    except ValidationError as error:
        raise fail("; ".join(describe_errors(error, PrivacyPolicy))) from None
    if directory.settings_file.exists():
        raise fail(f"{state} already holds an institution; use `confide-client start`")
    _check_data(data, label_column)
    try:
        enrollment = enroll(server, token, directory)
    except JoinError as error:
        raise fail(str(error)) from None
    config = InstitutionConfig(
        name=enrollment.institution,
        node_id=enrollment.node_id,
        superlink=enrollment.superlink,
        enrollment=server,
        data=data.resolve(),
        label_column=label_column,
        device=device,
        port=port,
        privacy=policy,
    )
    directory.save(config)
    console.print(
        f"joined as {config.name} (node {config.node_id}); credentials in {state}", highlight=False
    )
    if start:
        run_supernode(directory)


def run_supernode(directory: InstitutionDir) -> None:
    from confide.client.institution import InstitutionError
    from confide.client.supernode import run_supernode as run

    try:
        code = run(directory, lambda line: console.print(line, highlight=False))
    except InstitutionError as error:
        raise fail(str(error)) from None
    raise typer.Exit(code=code)


@app.command()
def start(state: DirOption) -> None:
    """Run this institution's SuperNode with the credentials saved by `join`."""
    from confide.client.institution import InstitutionDir

    run_supernode(InstitutionDir(state))


def main() -> None:
    app(prog_name="confide-client")


if __name__ == "__main__":
    sys.exit(main())
