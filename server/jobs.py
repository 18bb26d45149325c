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

Before a job starts, `submit` checks that enough enrolled institutions are online for the
job's minimums (or waits for them when asked): Flower's own ServerApp would otherwise wait
silently for the round timeout. Each submitted job is recorded in the audit log with who
submitted it and the hashes of the job and of the app Flower started.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w

from confide.common.config import ConfigFileError, read_toml, validate_file
from confide.common.errors import JobError, ModelFileError, RegistryError
from confide.common.files import write_atomic
from confide.server.app import JOB_KEY, NAME_KEY
from confide.server.audit import AuditError, AuditLog, operator_actor
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


def write_app(directory: StateDir, job: JobFile) -> Path:
    """The Flower app folder `flwr run` packs for this job (see the module docstring)."""
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
                    },
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
    try:
        reply = flwr_json(directory.flwr_home, "run", str(app), CONNECTION, timeout=120.0)
    except FlowerError as error:
        raise JobError(
            f"the SuperLink did not start the job: {error} (is `confide-server start` running?)"
        ) from None
    run_id = int(reply["run-id"])
    try:
        _audit_submission(directory, job, app, run_id)
    except AuditError as error:  # the job runs; the operator must know its record is missing
        say(f"warning: run {run_id} is not in the audit log: {error}")
    return Submitted(run_id, job.name, app, directory.runs / f"run-{run_id}", ignored)


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
    for run in reply.get("runs", []):
        results = directory.runs / f"run-{run['run-id']}"
        listed.append(run | {"results": str(results) if (results / RESULTS).is_file() else None})
    return listed


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
