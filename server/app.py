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
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from pydantic import ValidationError

from confide.server.central_dp import CentralDP
from confide.server.flower import RESULTS_ENV
from confide.server.history import JobHistory, RoundObserver, RoundRecord
from confide.server.job import JobConfig
from confide.server.polling import PromptGrid
from confide.server.results import (
    build_results,
    institution_row,
    privacy_document,
    write_results,
)
from confide.server.strategy import ConfideFedAvg, JobStopped
from confide.tasks.config import describe_errors, unflatten
from confide.tasks.datasets import Dataset
from confide.tasks.metrics import evaluate
from confide.tasks.registry import get_task
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
) -> JobHistory:
    test = test_set if test_set is not None else coordinator_test_set(job)
    task = get_task(job.task.name)
    model = task.build_model(job.task, test.features, test.classes, job.seed)
    central = CentralDP(job.central_privacy, noise_seed) if job.central_privacy.enabled else None
    strategy = ConfideFedAvg(job.federation, job.seed, history, central)

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


# Entry point of `flwr run` (named in the pyproject of the project and of every submitted job).
app = ServerApp()


@app.main()
def _main(grid: Grid, context: Context) -> None:
    name, job = job_from_run_config(dict(context.run_config))
    history = JobHistory()
    started = time.perf_counter()
    # Flower's deployed grid waits 3 s between pulls of replies; see confide.server.polling.
    run(job, PromptGrid(grid), history, None, None, name)  # type: ignore[arg-type]
    root = os.environ.get(RESULTS_ENV)
    if root and history.rounds:
        directory = Path(root) / f"run-{context.run_id}"
        write_deployed_results(directory, name, job, history, time.perf_counter() - started)
        log(INFO, "results written to %s", directory)
