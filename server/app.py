"""The coordinator's Flower ServerApp: FedAvg rounds with central evaluation every round.

Two entry points: `build_server_app` (simulation passes the job and collects the history) and
the module-level `app` that `flwr run` starts on a SuperLink. The latter reads the job from
the run config (`confide-server submit` puts it there as JSON) and, when the coordinator set
`CONFIDE_RESULTS_DIR`, writes the run's results there in the same format as a simulation.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from pydantic import ValidationError

from confide.common.config import describe_errors, unflatten
from confide.server.central_dp import CentralDP
from confide.server.flower import RESULTS_ENV, STATE_ENV
from confide.server.history import JobHistory, RoundObserver, RoundRecord
from confide.server.job import JobConfig
from confide.server.polling import PromptGrid
from confide.server.results import (
    build_results,
    institution_row,
    privacy_document,
    write_results,
)
from confide.server.strategy import ConfideFedAvg, JobStopped, TooFewInstitutions
from confide.tasks.datasets import Dataset
from confide.tasks.metrics import evaluate
from confide.tasks.registry import get_task

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from confide.server.audit import AuditLog, Detail
from confide.common.errors import JobFailed
from confide.tasks.splits import split_test

# Run config keys `confide-server submit` sets.
JOB_KEY = "confide-job"
NAME_KEY = "confide-job-name"


def build_server_app(
    job: JobConfig,
    *,
    name: str = "job",
    history: JobHistory | None = None,
    observer: RoundObserver | None = None,
    test_set: Dataset | None = None,
    noise_seed: int | None = None,
) -> ServerApp:
    """A ServerApp running `job`; results accumulate in `history`, `observer` sees each round.

    `test_set` is the coordinator's held-out data for central evaluation; by default it is the
    task's held-out split (the same split simulated institutions exclude from training).
    `noise_seed` seeds central DP noise (a simulation's seed; None: the OS CSPRNG).
    """
    app = ServerApp()
    history = history if history is not None else JobHistory()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run(job, grid, history, observer, test_set, name, noise_seed)

    return app


def run(
    job: JobConfig,
    grid: Grid,
    history: JobHistory,
    observer: RoundObserver | None,
    test_set: Dataset | None,
    name: str = "job",
    noise_seed: int | None = None,
    *,
    registered: Callable[[], dict[int, str]] | None = None,
) -> JobHistory:
    """Run `job` on `grid`; `registered` names the enrolled institutions in deployment (see
    `ConfideFedAvg`)."""
    test = test_set if test_set is not None else coordinator_test_set(job)
    task = get_task(job.task.name)
    model = task.build_model(job.task, test.features, test.classes, job.seed)
    central = CentralDP(job.central_privacy, noise_seed) if job.central_privacy.enabled else None
    strategy = ConfideFedAvg(job.federation, job.seed, history, central, registered=registered)

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate(model, test.x, test.y, test.classes)
        if server_round == 0:
            history.initial_metrics = metrics
            return MetricRecord(metrics)
        federated = strategy.last_evaluate_metrics
        record = RoundRecord(
            round=server_round,
            metrics=metrics,
            epsilon_max=history.epsilon_max,
            seconds=time.perf_counter() - strategy.round_started,
            trained=strategy.last_trained,
            federated_metrics=federated,
            epsilons=dict(strategy.last_epsilons),
            central_epsilon=central.epsilon if central is not None else None,
        )
        history.rounds.append(record)
        log(
            INFO,
            "round %d: accuracy %.4f, max epsilon %.3f",
            server_round,
            record.accuracy,
            record.epsilon_max,
        )
        if observer is not None:
            observer(record, history)
        return MetricRecord(metrics)

    labels = list(test.label_names) or [str(k) for k in range(test.classes)]
    config = ConfigRecord(job.instructions(test.features, labels, name).to_config())
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=job.federation.rounds,
            timeout=job.federation.timeout,
            train_config=config,
            evaluate_config=ConfigRecord(dict(config)),
            evaluate_fn=central_evaluation,
        )
    except JobStopped as stop:
        history.stopped = str(stop)
        log(INFO, "%s", stop)  # an expected end, reported in the results and summary
    return history


def coordinator_test_set(job: JobConfig) -> Dataset:
    """The data the coordinator scores the global model on: the whole file for a task that
    reads one (the coordinator's own held-out file), else the task's held-out split (the
    examples simulated institutions never see). Its columns and class names define the
    global model's input width and label encoding."""
    if get_task(job.task.name).needs_path:
        return get_task(job.task.name).load(job.task, job.seed)
    return split_test(job.task, job.data, job.seed)[1]


def job_from_run_config(run_config: dict[str, object]) -> tuple[str, JobConfig]:
    """(name, job) from a run config: JSON under `confide-job`, else flat dotted keys (the
    defaults in the project's pyproject, for `flwr run .`)."""
    if JOB_KEY in run_config:
        tree = json.loads(str(run_config[JOB_KEY]))
    else:
        tree = unflatten(dict(run_config))
    name = str(run_config.get(NAME_KEY, "job"))
    try:
        return name, JobConfig.model_validate(tree)
    except ValidationError as error:
        lines = describe_errors(error, JobConfig)
        raise ValueError("invalid run config:\n  " + "\n  ".join(lines)) from None


def write_deployed_results(
    directory: Path, name: str, job: JobConfig, history: JobHistory, seconds: float
) -> None:
    """results.json, job.toml and plots of a finished deployed run."""
    rows = [
        institution_row(
            key,
            job.privacy,
            history,
            key=key,
            examples=None,  # stays at the institution; only its declared size travels
            declared_examples=spend.declared_examples or None,
            validation_examples=spend.validation_examples,
        )
        for key, spend in sorted(history.institutions.items())
    ]
    report = privacy_document(name, job, history, rows, simulated=False)
    document = build_results(name, job, history, rows, {"total_seconds": seconds}, report)
    resolved = job.model_dump(mode="json", exclude_none=True)
    write_results(directory, document, history, ("job.toml", resolved), report)


class Deployment:
    """What the deployed ServerApp uses from the coordinator's state folder (named by
    `CONFIDE_STATE_DIR` in the SuperLink's environment): the enrolled institutions, the audit
    log and the results folder. Without it (`flwr run .` against a bare SuperLink), nodes
    are asked who they are, nothing is audited and no results are written."""

    def __init__(self, state: Path | None) -> None:
        self.state = state
        self._engine: Engine | None = None
        self._audit: AuditLog | None = None
        if state is not None:
            from confide.server.audit import AuditLog
            from confide.server.settings import StateDir
            from confide.server.state import open_database

            directory = StateDir(state)
            self._engine = open_database(directory.database_url(directory.load_settings()))
            self._audit = AuditLog(directory, self._engine)
        self._audited = 0  # entries of history.rejected already in the audit log

    @classmethod
    def from_environment(cls) -> Deployment:
        state = os.environ.get(STATE_ENV)
        return cls(Path(state) if state else None)

    def roster(self) -> Callable[[], dict[int, str]] | None:
        """Reads node id -> enrolled institution from the coordinator's database (None
        without a state folder: nodes are then asked)."""
        if self._engine is None:
            return None
        from confide.server.institutions import enrolled_nodes

        engine = self._engine
        return lambda: enrolled_nodes(engine)

    def audit(self, action: str, **details: str | int | float | bool | None) -> None:
        self._append(action, "coordinator", details)

    def _append(self, action: str, actor: str, details: dict[str, Detail]) -> None:
        """Append to the audit log; a log that cannot be written (AuditError: tampered, key
        gone) is reported in the run's log, once per entry, and does not stop the job —
        `confide-server audit verify` reports the damage."""
        if self._audit is None:
            return
        from confide.server.audit import AuditError

        try:
            self._audit.append(action, actor=actor, **details)
        except AuditError as error:
            log(WARNING, "audit log not written (%s): %s", action, error)

    def audit_refusals(self, run_id: int, history: JobHistory) -> None:
        """One `round.refused` entry per reply refused since the last call."""
        if self._audit is None:
            return
        for row in history.rejected[self._audited :]:
            details: dict[str, Detail] = {
                "run": run_id,
                "institution": str(row["institution"]),
                "round": int(row["round"]),
                "phase": str(row["phase"]),
                "reason": str(row["reason"]),
            }
            # Who refused: the institution (its error reply) or the coordinator (its update).
            by_institution = row.get("refused_by") == "institution"
            actor = f"institution:{row['institution']}" if by_institution else "coordinator"
            self._append("round.refused", actor, details)
        self._audited = len(history.rejected)

    def close(self) -> None:
        if self._audit is not None:
            self._audit.close()
        if self._engine is not None:
            self._engine.dispose()


# Entry point of `flwr run` (named in the pyproject of the project and of every submitted job).
app = ServerApp()


@app.main()
def _main(grid: Grid, context: Context) -> None:
    deployment = Deployment.from_environment()
    try:
        _deployed_run(deployment, grid, context)
    finally:
        deployment.close()


def _deployed_run(deployment: Deployment, grid: Grid, context: Context) -> None:
    """Run the job in the run config; results, audit entries and one clear line if it fails."""
    run_id = int(context.run_id)
    if JOB_KEY in context.run_config and deployment.state is None:
        # A job `confide-server submit` sent, on a SuperLink that was not started by
        # `confide-server start`: nodes could only be named from what they say. Refuse.
        raise JobFailed(
            f"the SuperLink's environment names no coordinator state folder ({STATE_ENV}); "
            "start it with `confide-server start`"
        )
    try:
        name, job = job_from_run_config(dict(context.run_config))
    except ValueError as error:
        deployment.audit("run.failed", run=run_id, reason=str(error))
        raise JobFailed(str(error)) from None
    history = JobHistory()
    started = time.perf_counter()

    def observe(record: RoundRecord, history: JobHistory) -> None:
        deployment.audit_refusals(run_id, history)

    # Flower's deployed grid waits 3 s between pulls of replies; see confide.server.polling.
    try:
        run(
            job,
            PromptGrid(grid),  # type: ignore[arg-type]
            history,
            observe,
            None,
            name,
            registered=deployment.roster(),
        )
    except TooFewInstitutions as error:
        deployment.audit_refusals(run_id, history)
        deployment.audit("run.failed", run=run_id, job=name, reason=str(error))
        raise JobFailed(f"job {name} failed: {error}") from None
    except Exception as error:  # recorded, then Flower logs it with its traceback
        deployment.audit_refusals(run_id, history)
        reason = f"{type(error).__name__}: {error}"
        deployment.audit("run.failed", run=run_id, job=name, reason=reason)
        raise
    deployment.audit_refusals(run_id, history)
    root = os.environ.get(RESULTS_ENV)
    if root and history.rounds:
        directory = Path(root) / f"run-{run_id}"
        write_deployed_results(directory, name, job, history, time.perf_counter() - started)
        log(INFO, "results written to %s", directory)
    ending = "run.stopped" if history.stopped else "run.finished"
    deployment.audit(
        ending,
        run=run_id,
        job=name,
        rounds=len(history.rounds),
        accuracy=history.rounds[-1].accuracy if history.rounds else None,
        reason=history.stopped,
    )
