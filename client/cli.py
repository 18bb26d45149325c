"""`confide-client`: join a coordinator and run this institution's SuperNode."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from confide.tasks.terminal import errors, fail

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
    max_delta: Annotated[
        float,
        typer.Option(help="refuse jobs asking a larger delta; the budget is stated at this delta"),
    ] = 1e-5,
    dataset: Annotated[
        str,
        typer.Option(
            help="the name this data's privacy spend is accounted under in the ledger (a new "
            "name starts a new budget: use one only for data about different people)"
        ),
    ] = "default",
    start: Annotated[bool, typer.Option(help="start the SuperNode after joining")] = True,
) -> None:
    """Verify the coordinator by the token's CA fingerprint, register a new key, then run."""
    from confide.client.enrollment import JoinError
    from confide.client.enrollment import join as enroll
    from confide.client.institution import DATASET_NAME, InstitutionConfig, InstitutionDir
    from confide.privacy.policy import PrivacyPolicy
    from confide.tasks.config import describe_errors

    token = _token(token, token_file)
    directory = InstitutionDir(state)
    try:
        policy = PrivacyPolicy(max_epsilon=max_epsilon, max_delta=max_delta)
    except ValidationError as error:
        raise fail("; ".join(describe_errors(error, PrivacyPolicy))) from None
    if not DATASET_NAME.fullmatch(dataset):
        raise fail(f"--dataset {dataset!r}: use letters, digits, '.', '_' and '-' (up to 64)")
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
        dataset=dataset,
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


budget_app = typer.Typer(
    help="This institution's privacy budget: what its data has spent over every job, from its "
    "ledger, and the ledger's integrity check.",
    no_args_is_help=False,
    invoke_without_command=True,
)
app.add_typer(budget_app, name="budget")


def _format(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return "unbounded" if math.isinf(value) else f"{value:.{digits}f}"


@budget_app.callback()
def budget(
    context: typer.Context,
    state: Annotated[
        Path | None, typer.Option("--dir", help="this institution's state directory")
    ] = None,
    delta: Annotated[
        float | None,
        typer.Option(
            help="state epsilon at this delta (default: the institution's max_delta, else 1e-5)"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Show spent and remaining epsilon per dataset (sample level, RDP, every job so far)."""
    if context.invoked_subcommand is not None:
        return
    if state is None:
        raise fail("give the institution's state directory: confide-client budget --dir DIR")
    from confide.client.budget import budget as read_budget
    from confide.client.institution import InstitutionError
    from confide.privacy.ledger import LedgerError

    try:
        lines = read_budget(state, delta)
    except (LedgerError, InstitutionError, FileNotFoundError) as error:
        raise fail(str(error)) from None
    if as_json:
        console.print_json(json.dumps([line.as_json() for line in lines]))
        return
    table = Table(title=f"Privacy budget of {state}")
    for column in ("dataset", "epsilon spent", "delta", "limit", "remaining", "rounds", "jobs"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for line in lines:
        table.add_row(
            line.dataset,
            _format(line.epsilon),
            f"{line.delta:g}",
            _format(line.max_epsilon, 2),
            _format(line.remaining),
            str(line.rounds),
            str(line.jobs),
        )
    console.print(table)
    console.print(
        "Sample-level (epsilon, delta) differential privacy of each dataset, composed over "
        "every DP-SGD round in this institution's ledger with the RDP accountant (Opacus).",
        highlight=False,
    )
    for line in lines:
        if len(line.fingerprints) > 1:
            console.print(
                f"note: dataset {line.dataset} was trained on {len(line.fingerprints)} different "
                "file contents; their spend is composed as if they held the same people.",
                highlight=False,
            )


@budget_app.command()
def verify(
    state: DirOption,
    reseal: Annotated[
        bool,
        typer.Option(
            help="accept the ledger as it now stands and return it to service (rows are kept "
            "as they are; REASON and the problems are recorded in it)"
        ),
    ] = False,
    reason: Annotated[str, typer.Option(help="why the reseal is right (with --reseal)")] = "",
) -> None:
    """Check the ledger's integrity chain; exit 1 if it fails (training refuses until then)."""
    from confide.privacy.ledger import Ledger, LedgerError

    ledger = Ledger(state)
    if not ledger.exists() and not ledger.key_path.exists() and not ledger.mark_path.exists():
        raise fail(f"{state}: no ledger here (nothing trained on this directory yet)")
    try:
        problems = ledger.verify()
        if not problems:
            entries = ledger.entries()
            last = f", last recorded {entries[-1].recorded_at}" if entries else ""
            console.print(f"ledger intact: {len(entries)} entries{last}", highlight=False)
            for entry in entries:
                if entry.kind == "reseal":
                    console.print(
                        f"  resealed by an operator at {entry.recorded_at}: {entry.note}",
                        highlight=False,
                    )
            return
        if reseal:
            ledger.reseal(reason)
            console.print(
                f"resealed with {len(problems)} problem(s) recorded; training may resume:",
                highlight=False,
            )
            for problem in problems:
                console.print(f"  - {problem}", highlight=False)
            return
    except LedgerError as error:
        raise fail(str(error)) from None
    errors.print(f"[bold red]ledger {ledger.path} failed verification:[/]", highlight=False)
    for problem in problems:
        errors.print(f"  - {problem}", highlight=False)
    errors.print(
        "Training on this institution refuses until this is resolved. Accept the ledger as "
        "it stands:\n"
        f"  confide-client budget verify --dir {state} --reseal --reason '...'\n"
        "A reseal keeps every row as it is now (an edited value stays edited) and records "
        "your reason and these problems in the ledger. Restoring ledger.sqlite and "
        "ledger.head from a backup also passes verification, but drops every round recorded "
        "since that backup: the budget would under-count. A file that is not a database at "
        "all cannot be resealed: move ledger.sqlite, ledger.head and ledger.key away to start "
        "an empty ledger, knowing the spend they held is lost.",
        highlight=False,
    )
    raise typer.Exit(code=1)


def main() -> None:
    app(prog_name="confide-client")


if __name__ == "__main__":
    sys.exit(main())
