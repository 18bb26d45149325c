"""What the dashboard shows: a read-only snapshot of a coordinator's state directory.

`StateReader.snapshot()` reads, on each call, what the coordinator and its ServerApps keep
there, through the modules that write it, never by parsing files by hand:

- institutions: the database's record (`confide.server.institutions.list_institutions`), with
  their live status from the SuperLink when a coordinator runs (`flwr supernode list`, at
  most every `STATUS_SECONDS`, in a background thread: it costs a process);
- runs: a finished run's `results.json` (`confide.server.results.Results`); a running job's
  encrypted checkpoint (`confide.server.checkpoint`), which its ServerApp replaces after every
  round, so the dashboard follows a job round by round; and the audit log's `job.submitted`,
  `run.resumed` and `run.failed` entries for runs with neither yet;
- the audit log (`confide.server.audit.AuditLog`): its newest entries and whether it verifies.

Read-only: the database is opened without creating tables (SQLite in read-only mode), the
audit log is only read and verified (never appended to: the dashboard takes no writer's
role; `verify(shared=True)` takes the log's lock shared, on a read-only descriptor, so an
append waits only while the rows are read), and checkpoints are only decrypted
(`CheckpointStore.load` creates no key).

Polling costs what changed, not what accumulated. The audit log is looked at through its
newest entry: only when that (or the head mark) changed are its newest AUDIT_SHOWN entries,
its count and the entries the run list needs (RUN_ACTIONS) read again and its chain verified
(the whole newest segment: the only read that grows with the log). Results and checkpoints
are parsed again only when their file changed (inode, mtime and size): polling a long job
costs one `stat` per file. Whatever cannot be read is named in the snapshot's `problems`
instead of failing the page.

Every epsilon is sent with its delta (the sample level's `delta`, the institution level's
`central_delta`, each ledger's `dataset_delta`), and an infinite one as the string
"unbounded" (`LedgerEpsilon`): JSON has no infinity, and results.json and checkpoints write
it as null, which would read as "no DP". Where the accounting applies (its delta is known),
a null epsilon is therefore that infinity.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import SQLAlchemyError

from confide.common.errors import (
    AuditError,
    AuditUnavailable,
    CheckpointError,
    FlowerError,
    RegistrationError,
)
from confide.common.refresh import Refreshed
from confide.privacy.report import UNBOUNDED, LedgerEpsilon, json_epsilon
from confide.server.audit import AuditEntry, AuditLog
from confide.server.checkpoint import SUFFIX, CheckpointStore
from confide.server.history import JobHistory, RoundRecord
from confide.server.results import RESULTS, RejectedUpdate, Results
from confide.server.settings import StateDir

AUDIT_SHOWN = 50  # the newest entries the page lists
# The audit entries the run list needs, for runs with neither results nor a checkpoint yet.
RUN_ACTIONS = ("job.submitted", "run.resumed", "run.failed")
# How old the SuperLink's node statuses may get before a refresh, and how long one may take:
# each is a `flwr` process (about 2 s of CPU, more on a busy host).
STATUS_SECONDS = 30.0
STATUS_TIMEOUT = 60.0

RunStatus = Literal["submitted", "running", "finished", "stopped", "failed"]
# An epsilon as the page gets it: a number, "unbounded" (infinite: no finite guarantee) or
# null (no such DP in this run).
Epsilon: TypeAlias = LedgerEpsilon


class _View(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InstitutionView(_View):
    """An enrolled institution and its status (`online`, `offline`, `revoked`, `unknown`)."""

    name: str
    node_id: str  # unsigned 64-bit: text, so JavaScript keeps every digit
    status: str
    registered_at: str
    revoked_at: str | None


class RoundPoint(_View):
    """One round of a run: the global model on the coordinator's test set, and the spend."""

    round: int
    accuracy: float | None
    loss: float | None  # null if the model diverged
    epsilon_max: Epsilon  # at the run's `delta`; null without DP
    central_epsilon: Epsilon  # at the run's `central_delta`; null without central DP
    institutions_trained: int
    seconds: float
    note: str | None = None


class InstitutionSpendView(_View):
    """An institution's sample-level epsilon in this run so far (at the run's `delta`), and
    its ledger's over every job at the ledger's own `dataset_delta` (as it last reported it)."""

    institution: str
    epsilon: Epsilon
    rounds_trained: int
    dataset_epsilon: Epsilon = None
    dataset_delta: float | None = None


class RunView(_View):
    """A run as the page shows it; `run` is the job's run identity (its results folder)."""

    run: str
    job: str
    status: RunStatus
    detail: str | None = None
    rounds_planned: int | None = None
    dp: bool | None = None
    delta: float | None = None  # sample level's, with DP
    institution_level_epsilon: Epsilon = None  # central DP's, after the last round
    central_delta: float | None = None  # with central DP
    initial_accuracy: float | None = None
    rounds: list[RoundPoint] = []
    institutions: list[InstitutionSpendView] = []
    refusals: list[RejectedUpdate] = []
    updated: str | None = None  # when its results or checkpoint were last written (UTC)


class AuditView(_View):
    """The audit log: its newest entries (newest first), how many it holds, and whether its
    chain verifies (`intact` None: not checked, see `problems`)."""

    total: int
    entries: list[AuditEntry]
    intact: bool | None
    problems: list[str] = []


class Snapshot(_View):
    """Everything the page shows, as /api/state serves it."""

    state: str
    taken_at: str
    institutions: list[InstitutionView]
    runs: list[RunView]
    audit: AuditView
    problems: list[str] = []


def read_only_engine(directory: StateDir) -> Engine:
    """The coordinator's database, opened without creating anything (`open_database` would
    create missing tables); SQLite in read-only mode, so no write can happen at all."""
    url = directory.database_url(directory.load_settings())
    prefix = "sqlite:///"
    if url.startswith(prefix) and "?" not in url:
        path = Path(url.removeprefix(prefix))
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the coordinator's database is missing")
        return create_engine(f"sqlite:///file:{quote(str(path))}?mode=ro&uri=true")
    return create_engine(url)


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


def _signature(path: Path) -> tuple[int, int, int] | None:
    """(mtime, size, inode): what changes when a file is rewritten or replaced (the
    ServerApp replaces its checkpoint atomically: a new inode)."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino


def _epsilon(value: float | str | None, *, accounted: bool) -> float | Literal["unbounded"] | None:
    """An epsilon for the page: infinity as "unbounded", and so is null where the accounting
    applies (`accounted`: its delta is known), since results.json and checkpoints write an
    infinite epsilon as null."""
    if value is None:
        return UNBOUNDED if accounted else None
    return json_epsilon(value)


@dataclass
class _Cached:
    signature: tuple[int, int, int]
    view: RunView


@dataclass(frozen=True)
class _AuditRead:
    """The audit log as last read, and which state of it (its newest entry's seq and MAC,
    the head mark's signature): read again only when that changed."""

    key: tuple[int, str, tuple[int, int, int] | None]
    view: AuditView
    runs: list[AuditEntry]  # the RUN_ACTIONS entries, in sequence order


class StateReader:
    """Reads snapshots of one state directory (see the module docstring); one per server."""

    def __init__(self, directory: StateDir, *, live_status: bool = True) -> None:
        directory.load_settings()  # StateError, naming the folder, if it is none
        self.directory = directory
        self.engine = read_only_engine(directory)
        self._runs: dict[Path, _Cached] = {}
        self._audit_read: _AuditRead | None = None
        from confide.server.enrollment import FlowerRegistrar

        registrar = FlowerRegistrar(directory.flwr_home, timeout=STATUS_TIMEOUT)
        self._statuses = (
            Refreshed(
                registrar.statuses,
                STATUS_SECONDS,
                name="node-statuses",
                expected=(RegistrationError, FlowerError, OSError),
            )
            if live_status
            else None
        )

    def close(self) -> None:
        self.engine.dispose()

    def snapshot(self) -> Snapshot:
        problems: list[str] = []
        audit, entries = self._audit(problems)
        return Snapshot(
            state=str(self.directory.root),
            taken_at=_utc(time.time()),
            institutions=self._institutions(problems),
            runs=self._runs_view(entries, problems),
            audit=audit,
            problems=problems,
        )

    # -- institutions ------------------------------------------------------------------------

    def _coordinator_running(self) -> bool:
        return self.directory.pid_file.is_file()

    def _institutions(self, problems: list[str]) -> list[InstitutionView]:
        from confide.server.institutions import list_institutions

        statuses: dict[int, str] = {}
        if self._statuses is not None and self._coordinator_running():
            answer = self._statuses.latest()  # never waits: a `flwr` process refreshes it
            statuses = answer.value or {}
            if answer.problem:
                problems.append(f"the SuperLink's node statuses: {answer.problem}")

        class _Known:
            def statuses(self) -> dict[int, str]:
                return statuses

            def unregister(self, node_id: int) -> None:  # never called: list only
                raise NotImplementedError

        try:
            rows = list_institutions(self.engine, _Known())
        except SQLAlchemyError as error:
            problems.append(f"institutions: the database: {getattr(error, 'orig', error)}")
            return []
        return [
            InstitutionView(
                name=row.name,
                node_id=str(row.node_id),
                status=row.status,
                registered_at=row.registered_at.isoformat(timespec="seconds"),
                revoked_at=row.revoked_at.isoformat(timespec="seconds") if row.revoked_at else None,
            )
            for row in rows
        ]

    # -- the audit log -----------------------------------------------------------------------

    def _audit(self, problems: list[str]) -> tuple[AuditView, list[AuditEntry]]:
        """(The audit view, the entries the run list needs), read again only when the log's
        newest entry or head mark changed (see the module docstring)."""
        log = AuditLog(self.directory, self.engine)
        try:
            last = log.newest(1)
            key = (
                last[0].seq if last else 0,
                last[0].mac if last else "",
                _signature(self.directory.audit_head),
            )
            read = self._audit_read
            if read is None or read.key != key:
                read = self._read_audit(log, key)
        except AuditError as error:
            problems.append(f"audit log: {error}")
            return AuditView(total=0, entries=[], intact=None, problems=[str(error)]), []
        return read.view, read.runs

    def _read_audit(
        self, log: AuditLog, key: tuple[int, str, tuple[int, int, int] | None]
    ) -> _AuditRead:
        newest = log.newest(AUDIT_SHOWN)
        total = log.count()
        runs = log.entries(actions=RUN_ACTIONS)
        cache = True
        intact: bool | None
        if not self.directory.audit_lock.exists():
            # Every append takes the lock, so entries without it were not appended by confide;
            # verifying would need the lock file, and the dashboard creates nothing.
            intact, found = (
                None,
                ([] if not total else ["not checked: the log's lock file is missing"]),
            )
        else:
            try:
                found = log.verify(shared=True)
                intact = not found
            except AuditUnavailable as error:  # not damage: tried again at the next request
                intact, found, cache = None, [str(error)], False
            except AuditError as error:  # a key file that is no key
                intact, found = False, [str(error)]
        read = _AuditRead(
            key, AuditView(total=total, entries=newest, intact=intact, problems=found), runs
        )
        if cache:
            self._audit_read = read
        return read

    # -- runs --------------------------------------------------------------------------------

    def _runs_view(self, entries: list[AuditEntry], problems: list[str]) -> list[RunView]:
        submitted: dict[str, str] = {}
        failed: dict[str, str] = {}
        resumes: dict[str, str] = {}  # a run that resumed another's job -> that job's run
        for entry in entries:
            run = entry.details.get("run")
            if run is None:
                continue
            run = str(run)
            if entry.action == "job.submitted":
                submitted[run] = str(entry.details.get("job"))
            elif entry.action == "run.resumed":  # the job goes on: an earlier failure is past
                resumes[run] = str(entry.details.get("resumes"))
                failed.pop(resumes[run], None)
            elif entry.action == "run.failed":
                failed[resumes.get(run, run)] = str(entry.details.get("reason"))
        found: dict[str, RunView] = {}
        runs, checkpoints = self.directory.runs, self.directory.root / "checkpoints"
        results = sorted(runs.glob(f"run-*/{RESULTS}")) if runs.is_dir() else []
        ckpts = sorted(checkpoints.glob(f"run-*{SUFFIX}")) if checkpoints.is_dir() else []
        for path in results:
            view = self._cached(path, problems, self._finished)
            if view is not None:
                found[view.run] = view
        for path in ckpts:
            run = path.name.removeprefix("run-").removesuffix(SUFFIX)
            if run in found:
                continue  # finished: a checkpoint left behind is of no use
            view = self._cached(path, problems, self._running)
            if view is not None:
                if run in failed:
                    view = view.model_copy(
                        update={
                            "status": "failed",
                            "detail": f"{failed[run]}; `confide-server resume {run}` continues "
                            f"it after round {len(view.rounds)}",
                        }
                    )
                found[run] = view
        for run, job in submitted.items():
            if run not in found:
                if run in failed:
                    found[run] = RunView(run=run, job=job, status="failed", detail=failed[run])
                else:
                    found[run] = RunView(
                        run=run, job=job, status="submitted", detail="no round recorded yet"
                    )
        seen = {*results, *ckpts}
        self._runs = {path: cached for path, cached in self._runs.items() if path in seen}
        return sorted(found.values(), key=_run_order, reverse=True)

    def _cached(
        self, path: Path, problems: list[str], read: Callable[[Path], RunView]
    ) -> RunView | None:
        signature = _signature(path)
        if signature is None:  # removed since it was listed (a job that just finished)
            return None
        cached = self._runs.get(path)
        if cached is not None and cached.signature == signature:
            return cached.view
        try:
            view = read(path)
        except (OSError, ValueError, CheckpointError) as error:
            problems.append(f"{path}: {error}")
            return None
        self._runs[path] = _Cached(
            signature, view.model_copy(update={"updated": _utc(signature[0] / 1e9)})
        )
        return self._runs[path].view

    @staticmethod
    def _finished(path: Path) -> RunView:
        results = Results.model_validate_json(path.read_text())
        central = results.privacy.institution_level
        delta = results.final.delta
        dp = results.dp
        return RunView(
            run=path.parent.name.removeprefix("run-"),
            job=results.scenario,
            status="stopped" if results.stopped else "finished",
            detail=results.stopped,
            rounds_planned=None,
            dp=dp,
            delta=delta,
            institution_level_epsilon=(
                _epsilon(central.epsilon, accounted=True) if central else None
            ),
            central_delta=central.delta if central else None,
            initial_accuracy=results.initial.get("accuracy"),
            rounds=[
                RoundPoint(
                    round=entry.round,
                    accuracy=entry.accuracy,
                    loss=entry.loss,
                    epsilon_max=_epsilon(entry.epsilon_max, accounted=dp),
                    central_epsilon=_epsilon(entry.central_epsilon, accounted=central is not None),
                    institutions_trained=entry.institutions_trained,
                    seconds=entry.seconds,
                    note=entry.note,
                )
                for entry in results.rounds
            ],
            institutions=[
                InstitutionSpendView(
                    institution=str(row.id),
                    epsilon=_epsilon(row.epsilon, accounted=dp),
                    rounds_trained=row.rounds_trained,
                    dataset_epsilon=_epsilon(
                        row.dataset_epsilon, accounted=row.dataset_delta is not None
                    ),
                    dataset_delta=row.dataset_delta,
                )
                for row in results.institutions
            ],
            refusals=results.rejected_updates,
        )

    def _running(self, path: Path) -> RunView:
        """A running job's view from its checkpoint, decrypted and parsed here (the model
        too, as base64: `Checkpoint` is one document). Only `_cached` calls it, when the file
        changed; nothing returned refers to the checkpoint, so the decrypted model is
        garbage as soon as this returns."""
        run = path.name.removeprefix("run-").removesuffix(SUFFIX)
        store = CheckpointStore.for_run(self.directory.root, run)
        checkpoint = store.load(run)
        job = checkpoint.job_config()
        history: JobHistory = checkpoint.history
        dp = job.privacy.enabled
        central = job.central_privacy.enabled
        view = RunView(
            run=run,
            job=checkpoint.name,
            status="running",
            detail=f"round {checkpoint.round} of {job.federation.rounds} done; a run whose "
            "coordinator stopped stays here until `confide-server resume`",
            rounds_planned=job.federation.rounds,
            dp=dp,
            delta=job.privacy.delta if dp else None,
            institution_level_epsilon=(
                _epsilon(history.rounds[-1].central_epsilon, accounted=central)
                if history.rounds
                else None
            ),
            central_delta=job.central_privacy.delta if central else None,
            initial_accuracy=history.initial_metrics.get("accuracy"),
            rounds=[_point(record, dp=dp, central=central) for record in history.rounds],
            institutions=[
                InstitutionSpendView(
                    institution=spend.institution,
                    epsilon=_epsilon(spend.epsilon, accounted=True) if dp else None,
                    rounds_trained=spend.rounds_trained,
                    dataset_epsilon=_epsilon(
                        spend.dataset_epsilon, accounted=spend.dataset_delta is not None
                    ),
                    dataset_delta=spend.dataset_delta,
                )
                for spend in history.institutions.values()
            ],
            refusals=[RejectedUpdate.model_validate(row) for row in history.rejected],
        )
        del checkpoint, history  # the decrypted model goes with them (see the docstring)
        return view


def _point(record: RoundRecord, *, dp: bool, central: bool) -> RoundPoint:
    return RoundPoint(
        round=record.round,
        accuracy=record.metrics.get("accuracy"),
        loss=record.metrics.get("loss"),
        epsilon_max=_epsilon(record.epsilon_max, accounted=True) if dp else None,
        central_epsilon=_epsilon(record.central_epsilon, accounted=central),
        institutions_trained=record.trained,
        seconds=round(record.seconds, 4),
        note=record.note,
    )


def _run_order(view: RunView) -> tuple[int, str]:
    """Newest first: run ids are numbers in deployment; anything else sorts after them."""
    return (int(view.run), "") if view.run.isdigit() else (-1, view.run)
