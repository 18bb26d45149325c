"""`confide-client`: join a coordinator and run this institution's SuperNode."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, cast, get_args

import typer
from pydantic import ValidationError
from rich.table import Table

from confide.common import metrics
from confide.common.terminal import RefusingGroup, errors, fail, output_console

if TYPE_CHECKING:
    from confide.client.budget import BudgetLine
    from confide.client.continuity import LedgerPlan
    from confide.client.enrollment import Enrollment
    from confide.client.institution import InstitutionConfig, InstitutionDir
    from confide.privacy.ledger import Ledger
    from confide.privacy.policy import PrivacyPolicy

app = typer.Typer(
    help="Join a confide coordinator as an institution and train on local data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=RefusingGroup,
)
console = output_console()
# InstitutionConfig's choices, checked by `join` before anything is registered.
Device = Literal["auto", "cpu", "cuda"]
NoiseGenerator = Literal["csprng", "torch"]
DirOption = Annotated[Path, typer.Option("--dir", help="this institution's state directory")]


def _check_data(path: Path, label_column: str) -> int:
    """Refuse unreadable data before anything is registered; return its example count."""
    from confide.tasks.datasets import DatasetError, read_file

    try:
        _, labels = read_file(path, label_column)
    except DatasetError as error:
        raise fail(f"--data: {error}") from None
    return len(labels)


def _training_size(rows: int) -> int:
    """The training examples of `rows` once the default validation share is held out."""
    from confide.client.institution import InstitutionConfig
    from confide.tasks.splits import training_size

    fraction = InstitutionConfig.model_fields["validation_fraction"].default
    return max(1, training_size(rows, fraction))


def _declare(declared: int | None, rows: int, max_delta: float) -> int:
    """The size to declare (the operator's, else the training examples rounded to two
    significant figures), refused here if the institution's max_delta is not below 1/N and
    1/n; warnings are printed."""
    from confide.client.institution import check_local_privacy
    from confide.privacy.mechanism import default_declared_size

    training = _training_size(rows)
    declared = declared or default_declared_size(training)
    warnings = check_local_privacy(
        declared_examples=declared, max_delta=max_delta, training_examples=training
    )
    for warning in warnings:
        console.print(f"warning: {warning}", highlight=False)
    return declared


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


def _ledger_plan(
    state: Path, data: Path, *, dataset: str, delta: float, continuity: Continuity
) -> LedgerPlan:
    """What the new folder's ledger continues; refused here, before anything is registered,
    if another ledger on this host spent on this data (`confide.client.continuity`)."""
    from confide.client.continuity import plan_ledger
    from confide.privacy.ledger import fingerprint_file

    try:
        return plan_ledger(
            state=state,
            data=data,
            fingerprint=fingerprint_file(data),
            dataset=dataset,
            delta=delta,
            ledger_from=continuity.ledger_from,
            new_budget=continuity.new_budget,
            reason=continuity.reason,
        )
    except OSError as error:
        raise fail(str(error)) from None


@dataclass(frozen=True)
class Continuity:
    """What `join` was told about an earlier ledger on the same data."""

    ledger_from: Path | None
    new_budget: bool
    reason: str


@dataclass(frozen=True)
class LocalChoices:
    """The institution's own settings given to `join`, checked before anything is written."""

    label_column: str
    device: Device
    port: int
    policy: PrivacyPolicy
    dataset: str
    noise_generator: NoiseGenerator
    metrics: metrics.Endpoint

    def settings(
        self, enrollment: Enrollment, *, server: str, data: Path, declared: int
    ) -> InstitutionConfig:
        """The settings file's contents once the coordinator registered the institution."""
        from confide.client.institution import InstitutionConfig

        return InstitutionConfig(
            name=enrollment.institution,
            node_id=enrollment.node_id,
            superlink=enrollment.superlink,
            enrollment=server,
            data=data.resolve(),
            declared_examples=declared,
            label_column=self.label_column,
            device=self.device,
            port=self.port,
            privacy=self.policy,
            dataset=self.dataset,
            noise_generator=self.noise_generator,
            metrics_port=self.metrics.port,
            metrics_address=self.metrics.address,
        )


def _local_choices(
    state: Path,
    *,
    label_column: str,
    device: str,
    port: int,
    limits: tuple[float, float],
    dataset: str,
    noise_generator: str,
    endpoint: metrics.Endpoint,
) -> LocalChoices:
    """The settings, each refused here with the option it came from: nothing is registered
    or written for a join that would fail later (a metrics port that cannot be bound now
    included: it is saved, and served by every start)."""
    from confide.client.institution import DATASET_NAME, InstitutionDir
    from confide.common.config import describe_errors
    from confide.privacy.policy import PrivacyPolicy

    max_epsilon, max_delta = limits
    try:
        policy = PrivacyPolicy(max_epsilon=max_epsilon, max_delta=max_delta)
    except ValidationError as error:
        raise fail("; ".join(describe_errors(error, PrivacyPolicy))) from None
    if not DATASET_NAME.fullmatch(dataset):
        raise fail(f"--dataset {dataset!r}: use letters, digits, '.', '_' and '-' (up to 64)")
    if InstitutionDir(state).settings_file.exists():
        raise fail(f"{state} already holds an institution; use `confide-client start`")
    if noise_generator not in get_args(NoiseGenerator):
        raise fail(f"--noise-generator {noise_generator!r}: use csprng or torch")
    if device not in get_args(Device):
        raise fail(f"--device {device!r}: use auto, cpu or cuda")
    try:
        metrics.check_bindable(endpoint)
    except OSError as error:
        raise fail(
            f"{metrics.port_taken('the institution', endpoint, error)}; nothing was registered "
            "and the token is still unused"
        ) from None
    return LocalChoices(
        label_column=label_column,
        device=cast(Device, device),
        port=port,
        policy=policy,
        dataset=dataset,
        noise_generator=cast(NoiseGenerator, noise_generator),
        metrics=endpoint,
    )


def _enroll(server: str, token: str, directory: InstitutionDir, plan: LedgerPlan) -> Enrollment:
    """Set up the ledger, then register with the coordinator; a refused join leaves no
    ledger behind that `prepare_ledger` made."""
    from confide.client.continuity import prepare_ledger, undo_ledger
    from confide.client.enrollment import JoinError
    from confide.client.enrollment import join as enroll
    from confide.privacy.ledger import LedgerError

    state = directory.root
    try:
        prepare_ledger(state, plan)
    except (LedgerError, OSError) as error:
        raise fail(f"{state}: cannot set up the ledger: {error}") from None
    try:
        return enroll(server, token, directory)
    except JoinError as error:
        undo_ledger(state, plan)
        raise fail(str(error)) from None


def _joined(directory: InstitutionDir, config: InstitutionConfig, plan: LedgerPlan) -> None:
    """Save the registered institution's settings, say so, and index its ledger."""
    from confide.client.continuity import index_ledger, mark_moved

    directory.save(config)
    state = directory.root
    console.print(
        f"joined as {config.name} (node {config.node_id}); credentials in {state}", highlight=False
    )
    console.print(
        f"declared size: {config.declared_examples} examples (published: every job's sampling "
        "rate, noise and this institution's weight follow from it; see docs/privacy.md)",
        highlight=False,
    )
    for warning in (index_ledger(state, plan), mark_moved(state, plan)):
        if warning:
            errors.print(warning, highlight=False)


ServerOption = Annotated[str, typer.Option(help="the coordinator's enrollment service, HOST:PORT")]
DataOption = Annotated[
    Path,
    typer.Option(
        help="local training data: CSV (with a label column), NPZ, or a folder of PNG images "
        "with one sub-folder per class"
    ),
]
TokenOption = Annotated[
    str | None, typer.Option(help="the join token from `confide-server token create`")
]
TokenFileOption = Annotated[
    Path | None,
    typer.Option(help="read the token from this file instead (keeps it out of `ps`)"),
]
PortOption = Annotated[
    int,
    typer.Option(
        help="the SuperNode's Runtime API port on 127.0.0.1, where confide's runner takes "
        "this institution's tasks (one per institution on a host)"
    ),
]
MaxEpsilonOption = Annotated[
    float, typer.Option(help="this institution's limit: refuse any round past this epsilon")
]
MaxDeltaOption = Annotated[
    float,
    typer.Option(help="refuse jobs asking a larger delta; the budget is stated at this delta"),
]
DatasetOption = Annotated[
    str,
    typer.Option(
        help="the name this data's privacy spend is accounted under in the ledger (a new "
        "name starts a new budget: use one only for data about different people)"
    ),
]
DeclaredOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=100_000_000,
        help="the size this institution publishes (DP-SGD's sampling rate and its update's "
        "weight follow from it); default: the training examples the data holds now, "
        "rounded to two significant figures",
    ),
]
NoiseGeneratorOption = Annotated[
    str,
    typer.Option(
        help="csprng (every noise value from the OS CSPRNG) or torch (PyTorch's generator "
        "seeded from the OS CSPRNG each round; not cryptographic, faster)"
    ),
]
LedgerFromOption = Annotated[
    Path | None,
    typer.Option(
        help="continue the privacy budget of the institution folder DIR: its ledger is "
        "copied here and the import recorded (stop its SuperNode first)",
        metavar="DIR",
    ),
]
NewBudgetOption = Annotated[
    bool,
    typer.Option(
        "--new-budget",
        help="start a new budget although another ledger on this host spent on this data "
        "(needs --reason, recorded in the new ledger)",
    ),
]
ReasonOption = Annotated[str, typer.Option(help="why a new budget is right (with --new-budget)")]


@app.command()
def join(
    *,
    server: ServerOption,
    state: DirOption,
    data: DataOption,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    label_column: Annotated[str, typer.Option(help="CSV label column")] = "label",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    port: PortOption = 9094,
    max_epsilon: MaxEpsilonOption = 10.0,
    max_delta: MaxDeltaOption = 1e-5,
    dataset: DatasetOption = "default",
    declared_examples: DeclaredOption = None,
    noise_generator: NoiseGeneratorOption = "csprng",
    ledger_from: LedgerFromOption = None,
    new_budget: NewBudgetOption = False,
    reason: ReasonOption = "",
    start: Annotated[bool, typer.Option(help="start the SuperNode after joining")] = True,
    metrics_port: metrics.SavedPortOption = None,
    metrics_address: metrics.SavedAddressOption = None,
) -> None:
    """Verify the coordinator by the token's CA fingerprint, register a new key, then run.

    Refuses, before contacting the coordinator, data that another ledger on this host already
    spent privacy budget on, unless --ledger-from or --new-budget says what to do. The
    metrics port and address are saved in institution.toml for every later `start` (9465 and
    127.0.0.1 unless given: two institutions on one host need ports of their own); a port
    that cannot be bound now refuses the join before anything is registered.
    """
    from confide.client.institution import METRICS_ADDRESS, METRICS_PORT, InstitutionDir

    token = _token(token, token_file)
    directory = InstitutionDir(state)
    local = _local_choices(
        state,
        label_column=label_column,
        device=device,
        port=port,
        limits=(max_epsilon, max_delta),
        dataset=dataset,
        noise_generator=noise_generator,
        endpoint=metrics.Endpoint(
            METRICS_ADDRESS if metrics_address is None else metrics_address,
            METRICS_PORT if metrics_port is None else metrics_port,
        ),
    )
    declared = _declare(declared_examples, _check_data(data, label_column), max_delta)
    continuity = Continuity(ledger_from, new_budget, reason)
    plan = _ledger_plan(state, data, dataset=dataset, delta=max_delta, continuity=continuity)
    enrollment = _enroll(server, token, directory, plan)
    config = local.settings(enrollment, server=server, data=data, declared=declared)
    _joined(directory, config, plan)
    if start:
        run_supernode(directory)  # /metrics where it was just saved


def run_supernode(
    directory: InstitutionDir, port: int | None = None, address: str | None = None
) -> None:
    """Run the SuperNode; /metrics at `port` and `address` where given, else where
    institution.toml says."""
    from confide.client.supernode import run_supernode as run

    code = run(
        directory,
        lambda line: console.print(line, highlight=False),
        metrics_port=port,
        metrics_address=address,
    )
    raise typer.Exit(code=code)


@app.command("rotate-key")
def rotate_key(state: DirOption) -> None:
    """Replace this institution's key with a new one made here, keeping this folder and so
    its privacy ledger; the coordinator unregisters the old key (restart the SuperNode)."""
    from confide.client.continuity import index_folder
    from confide.client.enrollment import rotate_key as rotate
    from confide.client.institution import InstitutionDir

    directory = InstitutionDir(state)
    try:
        config = directory.load()
        enrollment = rotate(directory, config.name, config.enrollment)
    except OSError as error:
        raise fail(str(error)) from None
    _save_rotated(directory, config, enrollment.node_id)
    console.print(
        f"new key for {config.name} registered (node {config.node_id} -> {enrollment.node_id}); "
        f"the old key no longer connects. Restart the SuperNode: confide-client start --dir "
        f"{state}",
        highlight=False,
    )
    if warning := index_folder(state):
        errors.print(warning, highlight=False)


def _save_rotated(directory: InstitutionDir, config: InstitutionConfig, node_id: int) -> None:
    """Write the new node id once the keys are rotated; if that fails, say exactly what
    stands: the rotation itself is done and is not to be repeated."""
    settings = directory.settings_file
    try:
        directory.save(config.model_copy(update={"node_id": node_id}))
    except OSError as error:
        raise fail(
            f"the key was rotated, but {settings} could not be saved ({error}). The "
            f"coordinator holds the new key as node {node_id} and unregistered node "
            f"{config.node_id}; the new keys are in place ({directory.private_key.name}, "
            f"{directory.public_key.name}); {settings.name} still names node {config.node_id}. "
            f"Fix: set node_id = {node_id} in {settings} once it is writable (the SuperNode "
            f"authenticates with its key, so it connects either way), then restart the "
            f"SuperNode: confide-client start --dir {directory.root}. Do not run rotate-key "
            "again for this."
        ) from None


@app.command()
def start(
    state: DirOption,
    metrics_port: metrics.SavedPortOption = None,
    metrics_address: metrics.SavedAddressOption = None,
) -> None:
    """Run this institution's SuperNode with the credentials saved by `join`, and confide's
    runner beside it: only confide's own ClientApp runs here (any other app is refused).
    /metrics (this institution's budget, for its own Prometheus) listens where `join` saved
    in institution.toml (127.0.0.1:9465 unless it was told otherwise) unless these options
    say otherwise for this start, and sends nothing anywhere."""
    from confide.client.institution import InstitutionDir

    run_supernode(InstitutionDir(state), metrics_port, metrics_address)


budget_app = typer.Typer(
    help="This institution's privacy budget: what its data has spent over every job, from its "
    "ledger, and the ledger's integrity check.",
    no_args_is_help=False,
    invoke_without_command=True,
)
app.add_typer(budget_app, name="budget")


# What `budget verify` says of each operator's entry in the ledger.
OPERATOR_ACTIONS = {
    "reseal": "resealed by an operator",
    "import": "imported from another folder's ledger",
    "new-budget": "new budget started by an operator",
    "moved": "moved to another folder, which continues its budget (no spend recorded here)",
}
# And of each entry the institution recorded by itself (no spend).
EVENTS = {
    "refused-app": "refused to run a run's app (nothing of it ran here)",
    "refused-round": "refused a round its limits do not allow (nothing trained)",
}


ACCOUNTANT_NAMES = {
    "rdp": "RDP accountant (Opacus)",
    "pld": "PLD accountant (Google dp-accounting)",
}


def _format(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return "unbounded" if math.isinf(value) else f"{value:.{digits}f}"


BudgetDirOption = Annotated[
    Path | None, typer.Option("--dir", help="this institution's state directory")
]
DeltaOption = Annotated[
    float | None,
    typer.Option(
        help="state epsilon at this delta (default: the institution's max_delta, else 1e-5)"
    ),
]
AccountantOption = Annotated[
    str | None,
    typer.Option(help="rdp or pld (default: the institution's [privacy] accountant, else rdp)"),
]


@budget_app.callback()
def budget(
    context: typer.Context,
    *,
    state: BudgetDirOption = None,
    delta: DeltaOption = None,
    accountant: AccountantOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Show spent and remaining epsilon per dataset (sample level, every job so far)."""
    if context.invoked_subcommand is not None:
        return
    if state is None:
        raise fail("give the institution's state directory: confide-client budget --dir DIR")
    from confide.client.budget import budget as read_budget

    if accountant not in (None, "rdp", "pld"):
        raise fail(f"--accountant {accountant!r}: use rdp or pld")
    try:
        lines = read_budget(state, delta, accountant)
    except FileNotFoundError as error:
        raise fail(str(error)) from None
    if as_json:
        console.print_json(json.dumps([line.as_json() for line in lines]))
        return
    _budget_table(state, lines)


def _budget_table(state: Path, lines: list[BudgetLine]) -> None:
    """The budget as a table, with what its numbers mean and a note for each dataset whose
    file changed between rounds."""
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
        "Sample-level (epsilon, delta) differential privacy of each dataset (add/remove one "
        "example), composed over every DP-SGD round in this institution's ledger with the "
        f"{ACCOUNTANT_NAMES[lines[0].accountant if lines else 'rdp']}.",
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
    """Check the ledger's integrity chain; exit 1 if it fails (training refuses until then).

    An intact ledger is also indexed on this host (`join` looks there for earlier spend)."""
    from confide.privacy.ledger import Ledger

    ledger = Ledger(state)
    if not ledger.exists() and not ledger.key_path.exists() and not ledger.mark_path.exists():
        raise fail(f"{state}: no ledger here (nothing trained on this directory yet)")
    problems = ledger.verify()
    if not problems:
        _intact(ledger, state)
        return
    if reseal:
        _resealed(ledger, problems, reason)
        return
    _failed_verification(ledger, problems, state)
    raise typer.Exit(code=1)


def _intact(ledger: Ledger, state: Path) -> None:
    """Say the ledger is intact, list what operators and the institution recorded in it, and
    index it on this host."""
    from confide.client.continuity import index_institution_ledger

    entries = ledger.entries()
    last = f", last recorded {entries[-1].recorded_at}" if entries else ""
    console.print(f"ledger intact: {len(entries)} entries{last}", highlight=False)
    listed = OPERATOR_ACTIONS | EVENTS
    for entry in entries:
        if entry.kind in listed:
            console.print(
                f"  {listed[entry.kind]} at {entry.recorded_at}: {entry.note}", highlight=False
            )
    index_institution_ledger(state, [e.fingerprint for e in entries if e.kind == "spend"])


def _resealed(ledger: Ledger, problems: list[str], reason: str) -> None:
    ledger.reseal(reason)
    console.print(
        f"resealed with {len(problems)} problem(s) recorded; training may resume:",
        highlight=False,
    )
    for problem in problems:
        console.print(f"  - {problem}", highlight=False)


def _failed_verification(ledger: Ledger, problems: list[str], state: Path) -> None:
    """What failed, and the operator's ways out (each with what it costs)."""
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


def main() -> None:
    app(prog_name="confide-client")


if __name__ == "__main__":
    main()
