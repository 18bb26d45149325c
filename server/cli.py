"""`confide-server`: set up a coordinator and invite institutions."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TextIO

import typer
from pydantic import ValidationError

from confide.common import metrics
from confide.common.terminal import RefusingGroup, errors, fail, output_console
from confide.server.cli_dashboard import dashboard
from confide.server.cli_models import models_app

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from confide.server.enrollment import FlowerRegistrar
    from confide.server.results import RejectedUpdate
    from confide.server.settings import ServerSettings, StateDir
    from confide.server.tokens import JoinToken

app = typer.Typer(
    help="Run a confide coordinator: a private CA, TLS, join tokens for institutions, and "
    "training jobs on the institutions that joined.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=RefusingGroup,
)
token_app = typer.Typer(help="Join tokens: single-use, expiring invitations.", no_args_is_help=True)
app.add_typer(token_app, name="token")
institutions_app = typer.Typer(help="Enrolled institutions: list and revoke.", no_args_is_help=True)
app.add_typer(institutions_app, name="institutions")
audit_app = typer.Typer(
    help="The audit log: list it (`audit --dir STATE`), check it (`audit verify --dir STATE`), "
    "or accept a damaged one as it stands (`audit reseal --dir STATE --reason TEXT`).",
    invoke_without_command=True,
)
app.add_typer(audit_app, name="audit")
app.add_typer(models_app, name="models")
app.command()(dashboard)


console = output_console()

StateOption = Annotated[Path, typer.Option("--dir", help="the coordinator's state directory")]


HostOption = Annotated[
    list[str] | None,
    typer.Option(
        help="a DNS name or IP address institutions use to reach this server "
        "(repeat; default localhost and 127.0.0.1)"
    ),
]
SuperlinkPortOption = Annotated[
    int, typer.Option(help="institutions' port (HTTPS; Flower's Fleet API only)")
]
ControlPortOption = Annotated[
    int,
    typer.Option(
        help="the SuperLink's own port, on 127.0.0.1 only (the operator's tools); "
        "0: a free one at each start"
    ),
]
EnrollmentPortOption = Annotated[int, typer.Option(help="enrollment service port (gRPC, TLS)")]
BindOption = Annotated[
    str, typer.Option(help="address the institutions' port and enrollment listen on")
]


@app.command()
def init(
    *,
    state: StateOption,
    host: HostOption = None,
    superlink_port: SuperlinkPortOption = 9091,
    control_port: ControlPortOption = 0,
    enrollment_port: EnrollmentPortOption = 9100,
    bind: BindOption = "0.0.0.0",
    force: Annotated[bool, typer.Option(help="replace an existing state directory")] = False,
) -> None:
    """Create a state directory: CA, TLS server certificate, database and settings."""
    from confide.server.settings import StateDir

    if state.exists() and any(state.iterdir()) and not force:
        raise fail(
            f"{state} exists and is not empty; use --force to replace it (this makes a "
            "new CA: every enrolled institution must join again)"
        )
    settings = _new_settings(
        # The coordinator reaches its own SuperLink locally, so the certificate names it too.
        hosts=list(dict.fromkeys([*(host or []), "localhost", "127.0.0.1"])),
        superlink_port=superlink_port,
        control_port=control_port,
        enrollment_port=enrollment_port,
        bind=bind,
    )
    directory = StateDir(state)
    fingerprint = _create_state(directory, settings)
    console.print(f"coordinator state created in {state}", highlight=False)
    console.print(f"  hosts in the TLS certificate: {', '.join(settings.hosts)}", highlight=False)
    console.print(f"  CA fingerprint (sha256): {fingerprint}", highlight=False)
    console.print(
        f"  secrets (mode 0600): {directory.ca_key}, {directory.server_key}", highlight=False
    )


def _new_settings(**values: list[str] | int | str) -> ServerSettings:
    """The settings `init` was given, refused with every problem named."""
    from confide.common.config import describe_errors
    from confide.server.settings import ServerSettings

    try:
        return ServerSettings.model_validate(values)
    except ValidationError as error:
        raise fail("; ".join(describe_errors(error, ServerSettings))) from None


def _create_state(directory: StateDir, settings: ServerSettings) -> str:
    """Write the CA, the server's certificate, the settings and an empty database into a
    folder only its owner can enter (it holds the CA key); the CA's fingerprint."""
    from confide.server import pki
    from confide.server.state import open_database

    directory.root.mkdir(parents=True, exist_ok=True)
    os.chmod(directory.root, 0o700)
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
    return pki.fingerprint(ca)


@token_app.command("create")
def token_create(
    *,
    state: StateOption,
    institution: Annotated[str, typer.Option(help="the institution's name (a-z, 0-9, -)")],
    ttl: Annotated[str, typer.Option(help="lifetime: 90m, 24h, 7d")] = "24h",
    out: Annotated[
        Path | None,
        typer.Option(help="write the token to this file (mode 0600) instead of stdout"),
    ] = None,
    force: Annotated[bool, typer.Option(help="with --out: replace an existing file")] = False,
) -> None:
    """Print a single-use join token for one institution (stored only as a hash).

    The token goes to stdout alone (for scripts) or, with --out, into a new file only its
    owner can read: a shell's `> file` would create it with the umask's mode."""
    issued: list[JoinToken] = []
    try:
        with _token_file(out, force) as stream:
            issued.append(_issue_token(state, institution, ttl))
            if stream is not None:
                stream.write(f"{issued[0]}\n")
    except OSError as error:
        said = (
            f"token {issued[0].token_id} was issued but not written: no one has it, and it "
            "expires unused"
            if issued
            else "no token was issued"
        )
        raise fail(f"{error.filename or out}: {error.strerror}; {said}") from None
    if out is None:
        errors.print(f"join token for {institution}, valid {ttl}, single use:", highlight=False)
        print(issued[0])  # stdout carries the token alone, for scripts
        return
    errors.print(
        f"join token for {institution}, valid {ttl}, single use, written to {out} (mode 0600)",
        highlight=False,
    )


def _issue_token(state: Path, institution: str, ttl: str) -> JoinToken:
    """A new token, stored (as a hash) and recorded in the audit log; refused with no token
    issued if either write fails."""
    from sqlalchemy.exc import SQLAlchemyError

    from confide.server import pki
    from confide.server.audit import AuditError, AuditLog, operator_actor
    from confide.server.settings import StateDir
    from confide.server.state import open_database
    from confide.server.tokens import create_token, parse_ttl

    directory = StateDir(state)
    try:
        settings = directory.load_settings()
        lifetime = parse_ttl(ttl)
        ca = pki.load_certificate(directory.ca_certificate)
        engine = open_database(directory.database_url(settings))
        try:
            token = create_token(
                engine, institution=institution, ttl=lifetime, ca_fingerprint=pki.fingerprint(ca)
            )
            AuditLog(directory, engine).append(
                "token.created",
                actor=operator_actor(),
                institution=institution,
                token_id=token.token_id,
                expires=_token_expiry(engine, token.token_id),
            )
        finally:
            engine.dispose()
    except AuditError as error:
        raise fail(f"{error}; the token was not issued") from None
    except SQLAlchemyError as error:
        cause = getattr(error, "orig", None) or error
        raise fail(f"the database: {cause}; the token was not issued") from None
    return token


@contextmanager
def _token_file(out: Path | None, force: bool) -> Iterator[TextIO | None]:
    """The file for the token (None: stdout), created before a token is issued, so one that
    cannot be created refuses with no token issued: a new file (O_EXCL, mode 0600 from the
    first byte; not over anything, a dangling symlink included), or with --force a private
    temporary file that replaces `out` at the end. Removed again if no token was written."""
    if out is None:
        yield None
        return
    if out.is_dir():
        raise fail(f"{out} is a folder")
    target = out
    if force:
        if not out.parent.is_dir():
            raise fail(f"{out}: the folder {out.parent} does not exist")
        try:
            descriptor, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        except OSError as error:
            raise fail(f"{out.parent}: {error.strerror}; no token was issued") from None
        target = Path(name)
    else:
        descriptor = _create_token_file(out)
    os.fchmod(descriptor, 0o600)  # whatever the umask
    try:
        with os.fdopen(descriptor, "w") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        if force:
            os.replace(target, out)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _create_token_file(out: Path) -> int:
    try:
        return os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise fail(f"{out} exists; use --force to replace it") from None
    except FileNotFoundError:
        raise fail(f"{out}: the folder {out.parent} does not exist") from None
    except OSError as error:
        raise fail(f"{out}: {error.strerror}; no token was issued") from None


def _token_expiry(engine: Engine, token_id: str) -> str:
    """When the token just issued expires (UTC, as stored)."""
    from sqlalchemy.orm import Session

    from confide.server.state import JoinTokenRow

    with Session(engine) as session:
        row = session.get(JoinTokenRow, token_id)
    if row is None:  # written in this process a moment ago: only a database that lost it
        raise fail(f"the database lost join token {token_id}; the token was not issued")
    return row.expires_at.isoformat(timespec="seconds")


def _open(state: Path) -> tuple[Engine, FlowerRegistrar]:
    from confide.server.enrollment import FlowerRegistrar
    from confide.server.state import open_database

    directory = _state(state)
    engine = open_database(directory.database_url(directory.load_settings()))
    return engine, FlowerRegistrar(directory.flwr_home, timeout=30)


def _state(state: Path) -> StateDir:
    """The coordinator's state folder, refused with a clear message if it is not one."""
    from confide.server.settings import StateDir

    directory = StateDir(state)
    directory.load_settings()
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
    from confide.server.audit import AuditError, AuditLog, operator_actor
    from confide.server.institutions import revoke

    engine, registrar = _open(state)
    node_id = revoke(engine, registrar, name)
    try:
        AuditLog(_state(state), engine).append(
            "institution.revoked", actor=operator_actor(), institution=name, node_id=node_id
        )
    except AuditError as error:
        errors.print(f"warning: the revocation is not in the audit log: {error}", highlight=False)
    console.print(
        f"revoked {name} (node {node_id}); a new join token re-enrolls it with a new key",
        highlight=False,
    )


@app.command()
def start(
    state: StateOption,
    metrics_port: metrics.PortOption = 9464,
    metrics_address: metrics.AddressOption = "127.0.0.1",
) -> None:
    """Run the coordinator: SuperLink, institutions' Fleet API front, enrollment service,
    and /metrics for Prometheus.

    The SuperLink (TLS, institution authentication) listens on 127.0.0.1 only: its Control
    API authenticates no caller. Institutions reach its Fleet API through the front on the
    public port, which refuses everything else. /metrics listens on 127.0.0.1 unless told
    otherwise and sends nothing anywhere."""
    from confide.server.coordinator import run_coordinator
    from confide.server.settings import StateDir

    directory = StateDir(state)
    try:
        settings = directory.load_settings()
        run_coordinator(
            directory,
            settings,
            lambda line: console.print(line, highlight=False),
            metrics=metrics.Endpoint(metrics_address, metrics_port),
        )
    except OSError as error:
        raise fail(str(error)) from None


@app.command()
def stop(state: StateOption) -> None:
    """Stop the coordinator running for this state directory (SIGTERM), and wait for it."""
    from confide.server.coordinator import stop_coordinator

    pid = stop_coordinator(_state(state))
    console.print(f"coordinator for {state} (pid {pid}) stopped", highlight=False)


@audit_app.callback()
def audit_list(
    context: typer.Context,
    state: Annotated[
        Path | None, typer.Option("--dir", help="the coordinator's state directory")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object a line")] = False,
) -> None:
    """The audit log's entries, oldest first."""
    if context.invoked_subcommand is not None:
        context.obj = state
        return
    if state is None:
        raise fail("Missing option '--dir': the coordinator's state directory")
    from rich.table import Table

    from confide.server.audit import AuditLog

    with AuditLog.open(_state(state)) as log:
        entries = log.entries()
    if as_json:
        for entry in entries:
            print(entry.model_dump_json())
        return
    table = Table(title=f"Audit log of {state}")
    for column in ("seq", "time (UTC)", "actor", "action", "details"):
        table.add_column(column)
    for entry in entries:
        details = ", ".join(f"{key}={value}" for key, value in entry.details.items())
        table.add_row(str(entry.seq), entry.at[:19], entry.actor, entry.action, details)
    console.print(table)


@audit_app.command("verify")
def audit_verify(
    context: typer.Context,
    state: Annotated[
        Path | None, typer.Option("--dir", help="the coordinator's state directory")
    ] = None,
) -> None:
    """Check the log: every entry's MAC and chain, no entry missing, the head mark (since the
    newest reseal, if any)."""
    from confide.server.audit import RESEALED, AuditError, AuditLog, AuditUnavailable

    state = state if state is not None else context.obj
    if state is None:
        raise fail("Missing option '--dir': the coordinator's state directory")
    with AuditLog.open(_state(state)) as log:
        try:
            problems = log.verify()
        except AuditUnavailable:
            raise
        except AuditError as error:  # damage that stops the check itself
            problems = [str(error)]
        entries = log.entries()
    if problems:
        for problem in problems:
            console.print(f"problem: {problem}", highlight=False)
        raise fail(
            f"the audit log of {state} is not intact ({len(problems)} problem(s)); once the "
            f"cause is understood, `confide-server audit reseal --dir {state} --reason TEXT` "
            "accepts it as it stands"
        )
    resealed = [entry for entry in entries if entry.action == RESEALED]
    since = (
        f" (checked from the reseal at entry {resealed[-1].seq}; the "
        f"{resealed[-1].seq - 1} before it are kept unchecked)"
        if resealed
        else ""
    )
    console.print(f"audit log intact: {len(entries)} entries{since}", highlight=False)


@audit_app.command("reseal")
def audit_reseal(
    context: typer.Context,
    reason: Annotated[
        str, typer.Option(help="why the log is accepted as it stands (recorded in it)")
    ],
    state: Annotated[
        Path | None, typer.Option("--dir", help="the coordinator's state directory")
    ] = None,
) -> None:
    """Accept a damaged audit log as it stands and start a new segment under a new key.

    For a log the coordinator and `token create` refuse to extend (its key or head mark lost
    or forged, entries inserted): the entries are kept as they are, no longer checked, and an
    `audit.resealed` entry records the reason, who resealed and the problems found. The old
    key is kept beside the new one (audit.key.replaced-TIME). Restoring a backup of the
    state folder (database, audit.key and audit.head together) is the other way out."""
    from confide.server.audit import AuditLog, operator_actor

    state = state if state is not None else context.obj
    if state is None:
        raise fail("Missing option '--dir': the coordinator's state directory")
    with AuditLog.open(_state(state)) as log:
        entry, problems = log.reseal(reason, actor=operator_actor())
    for problem in problems:
        console.print(f"accepted: {problem}", highlight=False)
    console.print(
        f"resealed: entry {entry.seq} starts a new segment under a new key; the "
        f"{entry.seq - 1} entries before it are kept, no longer checked",
        highlight=False,
    )


RunArgument = Annotated[int, typer.Argument(help="the run id `submit` printed")]


@app.command()
def submit(
    *,
    job: Annotated[Path, typer.Argument(help="job file (TOML; a scenario's schema)")],
    state: StateOption,
    follow: Annotated[
        bool, typer.Option(help="stream the run's log until it ends (--no-follow returns)")
    ] = True,
    wait: Annotated[
        float,
        typer.Option(
            help="seconds to wait for the job's federation.min_available institutions to be "
            "online (default: refuse at once if they are not)",
            min=0.0,
        ),
    ] = 0.0,
) -> None:
    """Validate a job and run it on the enrolled institutions; results go to STATE/runs/.

    Exit codes: 0 every round ran and no institution refused; 1 the run wrote no results
    (it failed or was stopped); 2 the job was refused before it started; 3 results were
    written but the job stopped early or institutions refused rounds.
    """
    from confide.server.jobs import logs
    from confide.server.jobs import submit as start_job

    directory = _state(state)
    submitted = start_job(
        directory, job, wait=wait, say=lambda line: errors.print(line, highlight=False)
    )
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
    outcome = _report(directory, submitted.run_id)
    if outcome is None:
        raise typer.Exit(1)
    if not outcome:
        raise typer.Exit(3)
    if code:
        raise typer.Exit(code)


@app.command()
def resume(
    *,
    run: Annotated[int, typer.Argument(help="the run whose job stopped mid-job")],
    state: StateOption,
    follow: Annotated[
        bool, typer.Option(help="stream the new run's log until it ends (--no-follow returns)")
    ] = True,
    wait: Annotated[
        float,
        typer.Option(
            help="seconds to wait for the job's killed run to be marked ended (about a "
            "minute after the kill) and for its federation.min_available institutions to be "
            "online (default: refuse at once)",
            min=0.0,
        ),
    ] = 0.0,
) -> None:
    """Continue a job whose coordinator stopped mid-job (killed, crashed) after its last
    completed round, from its encrypted checkpoint (STATE/checkpoints), in a new run; the
    job's results go to RUN's folder, STATE/runs/run-RUN/, and say it was resumed.

    Exit codes as for submit; 2 also when there is nothing to resume (no checkpoint, the
    run finished) or the checkpoint does not open with this coordinator's key."""
    from confide.server.jobs import logs
    from confide.server.jobs import resume as resume_job

    directory = _state(state)
    resumed = resume_job(directory, run, wait=wait, say=lambda line: errors.print(line))
    console.print(
        f"resumed {resumed.name} (run {run}) after round {resumed.after_round} of "
        f"{resumed.rounds} as run {resumed.run_id}; results will be in {resumed.results}",
        highlight=False,
    )
    if not follow:
        console.print(
            f"follow it with `confide-server logs {resumed.run_id} --dir {state}`",
            highlight=False,
        )
        return
    code = logs(directory, resumed.run_id, follow=True)
    outcome = _report(directory, run)
    if outcome is None:
        raise typer.Exit(1)
    if not outcome:
        raise typer.Exit(3)
    if code:
        raise typer.Exit(code)


def _report(directory: StateDir, run_id: int) -> bool | None:
    """Print a finished run's final accuracy and privacy spend from its results.json, and
    what institutions refused. True: complete; False: stopped early or refusals; None: the
    run wrote no results (it failed or was stopped)."""
    from confide.server.results import RESULTS, Results

    path = directory.runs / f"run-{run_id}" / RESULTS
    if not path.is_file():
        errors.print(f"run {run_id} wrote no results (see `confide-server status`)")
        return None
    results = Results.model_validate_json(path.read_text())
    final = results.final
    line = f"run {run_id}: final accuracy {final.accuracy:.4f}"
    if results.dp:
        # results.json holds an infinite epsilon as null
        epsilon = "unbounded" if final.epsilon_max is None else f"{final.epsilon_max:.3f}"
        line += (
            f", max epsilon {epsilon} at delta {final.delta:g} "
            f"(sample-level, {str(results.privacy.accountant).upper()} accountant, this run)"
        )
        spent = [row.dataset_epsilon for row in results.institutions]
        numbers = [value for value in spent if isinstance(value, float)]
        if "unbounded" in spent or numbers:
            most = "unbounded" if "unbounded" in spent else f"{max(numbers):.3f}"
            line += f"; institutions' ledgers, every job so far: max epsilon {most}"
    central = results.privacy.institution_level
    if central:
        line += (
            f"; institution level (central DP): epsilon {central.epsilon:.3f} at delta "
            f"{central.delta:g}"
        )
    console.print(f"{line}; {path}", highlight=False)
    refused = _refusals(results.rejected_updates)
    for institution, (count, reason) in sorted(refused.items()):
        console.print(
            f"{institution} refused {count} message(s) of this run; last reason: {reason}",
            highlight=False,
        )
    if results.stopped:
        console.print(f"stopped early: {results.stopped}", highlight=False)
    return not refused and not results.stopped


def _refusals(rejected: list[RejectedUpdate]) -> dict[str, tuple[int, str]]:
    """Institution -> (how many replies were refusals or refused, the last reason)."""
    counts: dict[str, tuple[int, str]] = {}
    for row in rejected:
        counts[row.institution] = (counts.get(row.institution, (0, ""))[0] + 1, row.reason)
    return counts


@app.command()
def status(
    state: StateOption,
    run: Annotated[int | None, typer.Option(help="only this run")] = None,
) -> None:
    """Runs on the SuperLink: status, elapsed time and where their results are."""
    from rich.table import Table

    from confide.server.jobs import runs

    directory = _state(state)
    listed = runs(directory, run)
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
    main()
