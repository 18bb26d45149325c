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
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w

from confide.server.app import JOB_KEY, NAME_KEY
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
from confide.tasks.config import ConfigFileError, read_toml, validate_file
from confide.tasks.files import write_atomic


class JobError(ValueError):
    """A job that cannot be submitted or found; the message says what and where."""


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
        raise JobError(str(error)) from None
    ignored = raw.pop("simulation", None) is not None
    raw.setdefault("name", path.stem)
    task = raw.get("task")
    if isinstance(task, dict) and isinstance(task.get("path"), str):
        task["path"] = str((path.parent / task["path"]).resolve())
    try:
        return validate_file(raw, JobFile, path, "job"), ignored
    except ConfigFileError as error:
        raise JobError(str(error)) from None


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


def submit(directory: StateDir, path: Path) -> Submitted:
    """Validate the job in `path` and start it on the coordinator's SuperLink."""
    job, ignored = load_job(path)
    app = write_app(directory, job)
    try:
        reply = flwr_json(directory.flwr_home, "run", str(app), CONNECTION, timeout=120.0)
    except FlowerError as error:
        raise JobError(
            f"the SuperLink did not start the job: {error} (is `confide-server start` running?)"
        ) from None
    run_id = int(reply["run-id"])
    return Submitted(run_id, job.name, app, directory.runs / f"run-{run_id}", ignored)


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


def logs(directory: StateDir, run_id: int, *, follow: bool) -> int:
    """Print the ServerApp's log of run `run_id` (`flwr log`); with `follow`, until it ends.
    Returns the command's exit code."""
    command = [
        executable("flwr"),
        "log",
        str(run_id),
        CONNECTION,
        "--stream" if follow else "--show",
    ]
    return subprocess.run(command, env=flower_environment(directory.flwr_home)).returncode
