"""`confide-server`: set up a coordinator and invite institutions."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from confide.tasks.terminal import errors, fail

if TYPE_CHECKING:
    pass

app = typer.Typer(
    help="Run a confide coordinator: a private CA, TLS, join tokens for institutions, and "
    "training jobs on the institutions that joined.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
token_app = typer.Typer(help="Join tokens: single-use, expiring invitations.", no_args_is_help=True)
app.add_typer(token_app, name="token")
institutions_app = typer.Typer(help="Enrolled institutions: list and revoke.", no_args_is_help=True)
app.add_typer(institutions_app, name="institutions")
console = Console()

StateOption = Annotated[Path, typer.Option("--dir", help="the coordinator's state directory")]


@app.command()
def init(
    state: StateOption,
    host: Annotated[
        list[str] | None,
        typer.Option(
            help="a DNS name or IP address institutions use to reach this server "
            "(repeat; default localhost and 127.0.0.1)"
        ),
    ] = None,
    superlink_port: Annotated[int, typer.Option(help="SuperLink port (HTTPS)")] = 9091,
    enrollment_port: Annotated[
        int, typer.Option(help="enrollment service port (gRPC, TLS)")
    ] = 9100,
    bind: Annotated[str, typer.Option(help="address both services listen on")] = "0.0.0.0",
    force: Annotated[bool, typer.Option(help="replace an existing state directory")] = False,
) -> None:
    """Create a state directory: CA, TLS server certificate, database and settings."""
    from confide.server import pki
    from confide.server.settings import ServerSettings, StateDir
    from confide.server.state import open_database
    from confide.tasks.config import describe_errors

    directory = StateDir(state)
    if state.exists() and any(state.iterdir()) and not force:
        raise fail(
            f"{state} exists and is not empty; use --force to replace it (this makes a "
            "new CA: every enrolled institution must join again)"
        )
    # The coordinator reaches its own SuperLink locally, so the certificate names it too.
    hosts = list(dict.fromkeys([*(host or []), "localhost", "127.0.0.1"]))
    try:
        settings = ServerSettings(
            hosts=hosts, superlink_port=superlink_port, enrollment_port=enrollment_port, bind=bind
        )
    except ValidationError as error:
        raise fail("; ".join(describe_errors(error, ServerSettings))) from None
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)  # it holds the CA key
    ca_key, ca = pki.create_ca()
    server_key, server = pki.issue_server_certificate(ca_key, ca, settings.hosts)
    pki.write_private_key(directory.ca_key, ca_key)
    pki.write_certificate(directory.ca_certificate, ca)
    pki.write_private_key(directory.server_key, server_key)
    pki.write_certificate(directory.server_certificate, server, ca)
    directory.save_settings(settings)
    database = directory.database_url(settings)
    open_database(database).dispose()
    if database.startswith("sqlite:///"):
        Path(database.removeprefix("sqlite:///")).chmod(0o600)
    console.print(f"coordinator state created in {state}", highlight=False)
    console.print(f"  hosts in the TLS certificate: {', '.join(settings.hosts)}", highlight=False)
    console.print(f"  CA fingerprint (sha256): {pki.fingerprint(ca)}", highlight=False)
    console.print(
        f"  secrets (mode 0600): {directory.ca_key}, {directory.server_key}", highlight=False
    )


@token_app.command("create")
def token_create(
    state: StateOption,
    institution: Annotated[str, typer.Option(help="the institution's name (a-z, 0-9, -)")],
    ttl: Annotated[str, typer.Option(help="lifetime: 90m, 24h, 7d")] = "24h",
) -> None:
    """Print a single-use join token for one institution (stored only as a hash)."""
    from confide.server import pki
    from confide.server.settings import StateDir, StateError
    from confide.server.state import open_database
    from confide.server.tokens import TokenError, create_token, parse_ttl

    directory = StateDir(state)
    try:
        settings = directory.load_settings()
        lifetime = parse_ttl(ttl)
        ca = pki.load_certificate(directory.ca_certificate)
        engine = open_database(directory.database_url(settings))
        token = create_token(engine, institution, lifetime, pki.fingerprint(ca))
        engine.dispose()
    except (StateError, TokenError, pki.PKIError) as error:
        raise fail(str(error)) from None
    errors.print(f"join token for {institution}, valid {ttl}, single use:", highlight=False)
    print(token)  # stdout carries the token alone, for scripts


def _open(state: Path):
    from confide.server.enrollment import FlowerRegistrar
    from confide.server.state import open_database

    directory = _state(state)
    engine = open_database(directory.database_url(directory.load_settings()))
    return engine, FlowerRegistrar(directory.flwr_home, timeout=30)


def _state(state: Path):
    """The coordinator's state folder, refused with a clear message if it is not one."""
    from confide.server.settings import StateDir, StateError

    directory = StateDir(state)
    try:
        directory.load_settings()
    except StateError as error:
        raise fail(str(error)) from None
    return directory


@institutions_app.command("list")
def institutions_list(state: StateOption) -> None:
    """Enrolled institutions, their node ids and live status from the SuperLink."""
    from rich.table import Table

    from confide.server.enrollment import RegistrationError
    from confide.server.institutions import list_institutions

    engine, registrar = _open(state)
    try:
        rows = list_institutions(engine, registrar)
    except RegistrationError as error:
        errors.print(f"warning: SuperLink not reachable ({error}); status unknown", highlight=False)
        rows = list_institutions(engine, None)
    table = Table(title=f"Institutions enrolled at {state}")
    for column in ("name", "node id", "status", "registered (UTC)"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.name, str(row.node_id), row.status, f"{row.registered_at:%Y-%m-%d %H:%M}")
    console.print(table)


@institutions_app.command("revoke")
def institutions_revoke(
    name: Annotated[str, typer.Argument(help="the institution to cut off")],
    state: StateOption,
) -> None:
    """Unregister the institution's key: its SuperNode is cut off and the key cannot return."""
    from confide.server.enrollment import RegistrationError
    from confide.server.institutions import InstitutionError, RotationRefused, revoke

    engine, registrar = _open(state)
    try:
        node_id = revoke(engine, registrar, name)
    except (InstitutionError, RegistrationError, RotationRefused) as error:
        raise fail(str(error)) from None
    console.print(
        f"revoked {name} (node {node_id}); a new join token re-enrolls it with a new key",
        highlight=False,
    )


@app.command()
def start(state: StateOption) -> None:
    """Run the SuperLink (TLS, institution authentication) and the enrollment service."""
    from confide.server.coordinator import CoordinatorError, run_coordinator
    from confide.server.settings import StateDir, StateError

    directory = StateDir(state)
    try:
        settings = directory.load_settings()
        run_coordinator(directory, settings, lambda line: console.print(line, highlight=False))
    except (StateError, CoordinatorError, OSError) as error:
        raise fail(str(error)) from None


RunArgument = Annotated[int, typer.Argument(help="the run id `submit` printed")]


@app.command()
def submit(
    job: Annotated[Path, typer.Argument(help="job file (TOML; a scenario's schema)")],
    state: StateOption,
    follow: Annotated[
        bool, typer.Option(help="stream the run's log until it ends (--no-follow returns)")
    ] = True,
) -> None:
    """Validate a job and run it on the enrolled institutions; results go to STATE/runs/."""
    from confide.server.jobs import JobError, logs
    from confide.server.jobs import submit as start_job

    directory = _state(state)
    try:
        submitted = start_job(directory, job)
    except JobError as error:
        raise fail(str(error)) from None
    if submitted.ignored_simulation:
        console.print(f"note: {job}: the [simulation] table is ignored in deployment")
    console.print(
        f"submitted {submitted.name} as run {submitted.run_id}; results will be in "
        f"{submitted.results}",
        highlight=False,
    )
    if not follow:
        console.print(
            f"follow it with `confide-server logs {submitted.run_id} --dir {state}`",
            highlight=False,
        )
        return
    code = logs(directory, submitted.run_id, follow=True)
    if not _report(directory, submitted.run_id):
        raise typer.Exit(1)
    if code:
        raise typer.Exit(code)


def _report(directory, run_id: int) -> bool:
    """Print a finished run's final accuracy and privacy spend from its results.json;
    False if the run wrote none (it failed or was stopped)."""
    import json

    from confide.server.results import RESULTS

    path = directory.runs / f"run-{run_id}" / RESULTS
    if not path.is_file():
        errors.print(f"run {run_id} wrote no results (see `confide-server status`)")
        return False
    results = json.loads(path.read_text())
    final = results["final"]
    line = f"run {run_id}: final accuracy {final['accuracy']:.4f}"
    if results["dp"]:
        accountant = str(results["privacy"]["accountant"]).upper()
        line += (
            f", max epsilon {final['epsilon_max']:.3f} at delta {final['delta']:g} "
            f"(sample-level, {accountant} accountant, this run)"
        )
        spent = [row["dataset_epsilon"] for row in results["institutions"]]
        spent = [value for value in spent if value is not None]
        if spent:
            most = "unbounded" if "unbounded" in spent else f"{max(spent):.3f}"
            line += f"; institutions' ledgers, every job so far: max epsilon {most}"
    central = results["privacy"].get("institution_level")
    if central:
        line += (
            f"; institution level (central DP): epsilon {central['epsilon']:.3f} at delta "
            f"{central['delta']:g}"
        )
    console.print(f"{line}; {path}", highlight=False)
    if results.get("stopped"):
        console.print(f"stopped early: {results['stopped']}", highlight=False)
    return True


@app.command()
def status(
    state: StateOption,
    run: Annotated[int | None, typer.Option(help="only this run")] = None,
) -> None:
    """Runs on the SuperLink: status, elapsed time and where their results are."""
    from rich.table import Table

    from confide.server.jobs import JobError, runs

    directory = _state(state)
    try:
        listed = runs(directory, run)
    except JobError as error:
        raise fail(str(error)) from None
    table = Table(title=f"Runs at {state}")
    for column in ("run", "job", "status", "elapsed", "results"):
        table.add_column(column)
    for row in listed:
        table.add_row(
            str(row["run-id"]),
            str(row["fab-name"]),
            str(row["status"]),
            str(row["elapsed"]),
            row["results"] or "-",
        )
    console.print(table)


@app.command("logs")
def show_logs(
    run: RunArgument,
    state: StateOption,
    follow: Annotated[bool, typer.Option(help="keep streaming until the run ends")] = False,
) -> None:
    """The coordinator's log of a run (rounds, accuracy, epsilon, refused updates)."""
    from confide.server.jobs import logs

    code = logs(_state(state), run, follow=follow)
    if code:
        raise typer.Exit(code)


def main() -> None:
    app(prog_name="confide-server")


if __name__ == "__main__":
    sys.exit(main())
