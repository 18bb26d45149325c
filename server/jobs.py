"""Training jobs on the coordinator's SuperLink: submit, list, read logs.

A job file has the schema of a simulation scenario without `[simulation]` (a scenario file is
accepted; that table is ignored). Submitting one writes a small Flower app into
`STATE/jobs/<name>-<UTC time>/`: a pyproject naming confide's ServerApp and ClientApp, with
the validated job as JSON in its run config. `flwr run` packs that folder into a FAB and
starts it on the SuperLink. The app names confide's own entry points, which every institution
has installed (runtime dependency installation is off on both sides); the folder holds no
other code.

The ServerApp writes each run's results to `STATE/runs/run-<id>/` (results.json, job.toml,
plots), the same format as a simulation's.

A job whose coordinator stopped mid-job (killed, crashed) is continued with `resume`: it
submits a new run of the job its checkpoint holds (STATE/checkpoints/run-<id>.ckpt, see
confide.server.checkpoint), with the run config naming the run it resumes; that run goes on
after the last completed round and writes the job's results into the first run's folder.

Before a job starts, `submit` checks that enough enrolled institutions are online for the
job's minimums (or waits for them when asked): Flower's own ServerApp would otherwise wait
silently for the round timeout. Each submitted job is recorded in the audit log with who
submitted it and the hashes of the job and of the app Flower started.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import ValidationError

from confide.common.config import ConfigFileError, read_toml, validate_file
from confide.common.errors import CheckpointError, JobError, ModelFileError, RegistryError
from confide.common.files import write_atomic
from confide.server.app import JOB_KEY, NAME_KEY, RESUME_KEY
from confide.server.audit import AuditError, AuditLog, operator_actor
from confide.server.checkpoint import CheckpointStore
from confide.server.flower import (
    CONNECTION,
    FlowerError,
    executable,
    flower_environment,
    flwr_json,
)
from confide.server.job import JobFile
from confide.server.results import RESULTS
from confide.server.settings import StateDir
from confide.tasks.config import resolve_task_path


@dataclass(frozen=True)
class Submitted:
    run_id: int
    name: str
    app: Path
    results: Path
    ignored_simulation: bool


def load_job(path: Path) -> tuple[JobFile, bool]:
    """The validated job in `path`, and whether a `[simulation]` table was ignored.

    A relative `task.path` is taken relative to the job file: the ServerApp runs elsewhere.
    """
    try:
        raw = read_toml(path)
    except ConfigFileError as error:
        raise JobError(str(error)) from error
    ignored = raw.pop("simulation", None) is not None
    raw.setdefault("name", path.stem)
    raw = resolve_task_path(raw, path.parent)
    try:
        return validate_file(raw, JobFile, path=path, what="job"), ignored
    except ConfigFileError as error:
        raise JobError(str(error)) from error


def flower_app_name(name: str) -> str:
    """A name Flower accepts for the job's app (a letter, then letters, digits or '-', at most
    32 characters); the job keeps its own name in the run config and the results."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not cleaned[:1].isalpha():
        cleaned = f"job-{cleaned}"
    return cleaned[:32].rstrip("-")


def write_app(directory: StateDir, job: JobFile, extra: dict[str, str] | None = None) -> Path:
    """The Flower app folder `flwr run` packs for this job (see the module docstring), with
    `extra` run config keys (`confide-resume`)."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    folder = directory.jobs / f"{job.name}-{stamp}"
    folder.mkdir(parents=True)
    pyproject: dict[str, Any] = {
        "project": {
            "name": flower_app_name(job.name),
            "version": "1.0.0",
            "description": job.description or f"confide job {job.name}",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "confide",
                    "components": {
                        "serverapp": "confide.server.app:app",
                        "clientapp": "confide.client.app:app",
                    },
                    "config": {
                        NAME_KEY: job.name,
                        JOB_KEY: job.job().model_dump_json(exclude_none=True),
                    }
                    | (extra or {}),
                }
            }
        },
    }
    write_atomic(folder / "pyproject.toml", tomli_w.dumps(pyproject))
    return folder


def online_institutions(directory: StateDir) -> list[str]:
    """Names of the enrolled, unrevoked institutions whose SuperNode is online now."""
    from confide.server.institutions import enrolled_nodes
    from confide.server.state import open_database

    try:
        reply = flwr_json(directory.flwr_home, "supernode", "list", CONNECTION)
    except FlowerError as error:
        raise JobError(
            f"cannot list the institutions online: {error} (is `confide-server start` running?)"
        ) from None
    online = {int(node["node-id"]) for node in reply.get("nodes", []) if node["status"] == "online"}
    engine = open_database(directory.database_url(directory.load_settings()))
    try:
        enrolled = enrolled_nodes(engine)
    finally:
        engine.dispose()
    return sorted(name for node, name in enrolled.items() if node in online)


def wait_for_institutions(
    directory: StateDir, job: JobFile, *, wait: float, say: Callable[[str], None]
) -> list[str]:
    """The institutions online once the job's `federation.min_available` are; JobError with
    the numbers if they are not within `wait` seconds (0: refuse at once)."""
    needed = job.federation.min_available
    deadline: float | None = None  # counted from the first listing: one costs a `flwr` process
    while True:
        online = online_institutions(directory)
        deadline = time.monotonic() + wait if deadline is None else deadline
        left = deadline - time.monotonic()
        if len(online) >= needed:
            return online
        if left <= 0:
            listed = f": {', '.join(online)}" if online else ""
            raise JobError(
                f"job {job.name} needs {needed} institutions online (federation.min_available, "
                f"min_train {job.federation.min_train}); {len(online)} "
                f"{'is' if len(online) == 1 else 'are'}{listed}. Start the others "
                "(`confide-client start`), lower the job's minimums, or wait for them with "
                "--wait SECONDS"
            )
        say(
            f"waiting for institutions: {len(online)} of {needed} online; "
            f"{left:.0f}s left (Ctrl-C to give up)"
        )
        time.sleep(min(5.0, max(left, 0.1)))


def check_starting_model(directory: StateDir, job: JobFile) -> None:
    """Refuse, before anything starts, a `[model] init` that is not a registered version of
    this coordinator fitting the job (the ServerApp checks it again when the run starts)."""
    from confide.server.model_file import check_continues
    from confide.server.model_registry import ModelRegistry, parse_reference
    from confide.server.state import open_database

    reference = job.model.init
    if reference is None:
        return
    try:
        parse_reference(reference)
    except RegistryError as error:
        raise JobError(f"{job.name}: [model] init: {error}") from None
    engine = open_database(directory.database_url(directory.load_settings()))
    try:
        model = ModelRegistry(directory, engine).get(reference)
        check_continues(model.card, job, what=reference)
    except (RegistryError, ModelFileError) as error:
        raise JobError(f"{job.name}: [model] init: {error}") from None
    finally:
        engine.dispose()


def submit(
    directory: StateDir,
    path: Path,
    *,
    wait: float = 0.0,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> Submitted:
    """Validate the job in `path`, check (or wait `wait` seconds) that enough institutions are
    online, start it on the coordinator's SuperLink and record it in the audit log."""
    job, ignored = load_job(path)
    check_starting_model(directory, job)
    wait_for_institutions(directory, job, wait=wait, say=say)
    app = write_app(directory, job)
    run_id = _flwr_run(directory, app)
    try:
        _audit_submission(directory, job, app, run_id)
    except AuditError as error:  # the job runs; the operator must know its record is missing
        say(f"warning: run {run_id} is not in the audit log: {error}")
    return Submitted(run_id, job.name, app, directory.runs / f"run-{run_id}", ignored)


def _flwr_run(directory: StateDir, app: Path) -> int:
    """Start the app folder `app` on the coordinator's SuperLink; the new run's id."""
    try:
        reply = flwr_json(directory.flwr_home, "run", str(app), CONNECTION, timeout=120.0)
    except FlowerError as error:
        raise JobError(
            f"the SuperLink did not start the job: {error} (is `confide-server start` running?)"
        ) from None
    return int(reply["run-id"])


@dataclass(frozen=True)
class Resumed:
    run_id: int  # the new run
    resumes: int  # the run whose job it continues
    name: str
    after_round: int
    rounds: int
    results: Path


def resume(
    directory: StateDir,
    run_id: int,
    *,
    wait: float = 0.0,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> Resumed:
    """Continue the job of run `run_id` after its last checkpointed round, in a new run (see
    the module docstring), once enough institutions are online; audited (`run.resumed`). A
    job that completed its rounds but died before its results were written is resumed to
    write them.

    Refused (JobError) when the run finished (its results are written; a checkpoint left
    behind is removed) or when a run of the job is still pending or running after `wait`
    seconds (the first, or one that resumed it: two runs of one job would release twice
    what one accounts);
    CheckpointError when it has no checkpoint or the checkpoint cannot be read with this
    coordinator's key (altered, truncated, another coordinator's). Two `resume` commands
    take turns (a lock in STATE/checkpoints)."""
    folder = directory.runs / f"run-{run_id}"
    store = CheckpointStore.for_run(directory.root, str(run_id))
    with _resume_lock(store):
        if (folder / RESULTS).is_file():
            store.remove()  # the job ended; a checkpoint left behind is of no use
            raise JobError(f"run {run_id} finished: its results are in {folder}; nothing to resume")
        checkpoint = store.load(str(run_id))
        try:
            job = JobFile.model_validate(json.loads(checkpoint.job) | {"name": checkpoint.name})
        except (ValidationError, ValueError) as error:
            raise CheckpointError(
                f"the checkpoint of run {run_id} holds a job this version cannot read: {error}"
            ) from None
        checkpoint.check_job(job.job())
        rounds = job.federation.rounds
        _wait_while_running(directory, run_id, _resumers(store), wait=wait, say=say)
        wait_for_institutions(directory, job, wait=wait, say=say)
        app = write_app(directory, job, {RESUME_KEY: str(run_id)})
        new_run = _flwr_run(directory, app)
        _add_resumer(store, new_run)
    try:
        with AuditLog.open(directory) as audit:
            audit.append(
                "run.resumed",
                actor=operator_actor(),
                run=new_run,
                resumes=run_id,
                job=job.name,
                after_round=checkpoint.round,
                job_sha256=checkpoint.job_sha256,
                app_folder=str(app),
            )
    except AuditError as error:  # the run goes on; the operator must know its record is missing
        say(f"warning: run {new_run} is not in the audit log: {error}")
    return Resumed(new_run, run_id, job.name, checkpoint.round, rounds, folder)


@contextmanager
def _resume_lock(store: CheckpointStore) -> Iterator[None]:
    """One `resume` at a time on this coordinator (an exclusive lock beside the checkpoints)."""
    store.path.parent.mkdir(parents=True, exist_ok=True)
    with (store.path.parent / "resume.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _resumers_file(store: CheckpointStore) -> Path:
    return store.path.with_suffix(".runs")


def _resumers(store: CheckpointStore) -> list[int]:
    """The runs that resumed this job so far (written by `resume`)."""
    try:
        return [int(run) for run in json.loads(_resumers_file(store).read_text())]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError) as error:
        raise JobError(f"{_resumers_file(store)} cannot be read: {error}") from None


def _add_resumer(store: CheckpointStore, run_id: int) -> None:
    write_atomic(_resumers_file(store), json.dumps([*_resumers(store), run_id]), mode=0o600)


def _wait_while_running(
    directory: StateDir,
    run_id: int,
    resumers: list[int],
    *,
    wait: float,
    say: Callable[[str], None],
) -> None:
    """Wait up to `wait` seconds until neither the job's first run nor a run that resumed
    it is pending, starting or running in Flower's list (such a run may still release rounds
    of the job); JobError if one still is. A run whose coordinator was killed stays
    `running` until its heartbeat lapses (about a minute after the kill), when the SuperLink
    marks it failed."""
    ours = {run_id, *resumers}
    deadline = time.monotonic() + wait
    said = False
    while True:
        active = [
            (int(run["run-id"]), str(run.get("status", "")))
            for run in runs(directory)
            if int(run["run-id"]) in ours and not str(run.get("status", "")).startswith("finished")
        ]
        if not active:
            return
        run, status = active[0]
        if time.monotonic() >= deadline:
            raise JobError(
                f"run {run} of this job is {status}: resuming now would run the job twice; "
                "wait until it has ended (`confide-server status`; a run whose coordinator "
                "was killed is marked failed once its heartbeat lapses, about a minute), or "
                "pass --wait SECONDS"
            )
        if not said:
            say(f"waiting for run {run} ({status}) to end ...")
            said = True
        time.sleep(2.0)


def _audit_submission(directory: StateDir, job: JobFile, app: Path, run_id: int) -> None:
    """`job.submitted`: who (the operator's OS account), the job's hash and the hash of the
    app Flower packed (as `flwr ls` reports it: the FAB the institutions check)."""
    try:
        fab_hash = runs(directory, run_id)[0].get("fab-hash")
    except (JobError, IndexError):
        fab_hash = None
    with AuditLog.open(directory) as audit:
        audit.append(
            "job.submitted",
            actor=operator_actor(),
            run=run_id,
            job=job.name,
            job_sha256=hashlib.sha256(
                job.job().model_dump_json(exclude_none=True).encode()
            ).hexdigest(),
            app_sha256=fab_hash,
            app_folder=str(app),
        )


def runs(directory: StateDir, run_id: int | None = None) -> list[dict[str, Any]]:
    """Flower's record of the runs (`flwr ls`), each with the folder of its results if any."""
    args = ["ls", CONNECTION] + (["--run-id", str(run_id)] if run_id is not None else [])
    try:
        reply = flwr_json(directory.flwr_home, *args)
    except FlowerError as error:
        raise JobError(f"cannot list runs: {error}") from None
    listed = []
    resumed: dict[str, Path] | None = None
    for run in reply.get("runs", []):
        results = directory.runs / f"run-{run['run-id']}"
        if not (results / RESULTS).is_file():
            # A run that resumed another's job wrote into that run's folder.
            resumed = _resuming_runs(directory) if resumed is None else resumed
            results = resumed.get(str(run["run-id"]), results)
        listed.append(run | {"results": str(results) if (results / RESULTS).is_file() else None})
    return listed


def _resuming_runs(directory: StateDir) -> dict[str, Path]:
    """Run id -> the results folder of the job it resumed (results.json's `resumed`)."""
    found: dict[str, Path] = {}
    for path in directory.runs.glob(f"run-*/{RESULTS}"):
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # unreadable results name no run; `status` shows the folder as it is
        for entry in document.get("resumed") or []:
            found[str(entry.get("run"))] = path.parent
    return found


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def logs(directory: StateDir, run_id: int, *, follow: bool) -> int:
    """Print the ServerApp's log of run `run_id` (`flwr log`); with `follow`, until it ends.
    Flower's log lines carry ANSI colours: kept on a terminal, removed otherwise (files,
    pipes). Returns the command's exit code."""
    command = [
        executable("flwr"),
        "log",
        str(run_id),
        CONNECTION,
        "--stream" if follow else "--show",
    ]
    environment = flower_environment(directory.flwr_home)
    if sys.stdout.isatty():
        return subprocess.run(command, env=environment).returncode
    with subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, text=True, errors="replace"
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(ANSI_ESCAPE.sub("", line))
            sys.stdout.flush()
    return process.returncode
