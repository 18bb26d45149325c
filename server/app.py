"""The coordinator's Flower ServerApp: FedAvg rounds with central evaluation every round."""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from pydantic import ValidationError

from confide.server.history import JobHistory, RoundObserver, RoundRecord
from confide.server.job import JobConfig
from confide.server.strategy import ConfideFedAvg
from confide.tasks.config import describe_errors, unflatten
from confide.tasks.datasets import Dataset
from confide.tasks.metrics import evaluate
from confide.tasks.registry import get_task
from confide.tasks.splits import split_test


def build_server_app(
    job: JobConfig,
    *,
    history: JobHistory | None = None,
    observer: RoundObserver | None = None,
    test_set: Dataset | None = None,
) -> ServerApp:
    """A ServerApp running `job`; results accumulate in `history`, `observer` sees each round.

    `test_set` is the coordinator's held-out data for central evaluation; by default it is the
    task's held-out split (the same split simulated institutions exclude from training).
    """
    app = ServerApp()
    history = history if history is not None else JobHistory()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run(job, grid, history, observer, test_set)

    return app


def run(
    job: JobConfig,
    grid: Grid,
    history: JobHistory,
    observer: RoundObserver | None,
    test_set: Dataset | None,
) -> JobHistory:
    test = test_set if test_set is not None else split_test(job.task, job.data, job.seed)[1]
    task = get_task(job.task.name)
    model = task.build_model(job.task, test.features, test.classes, job.seed)
    strategy = ConfideFedAvg(job.federation, job.seed, history)

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

    config = ConfigRecord(job.instructions().to_config())
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=job.federation.rounds,
        timeout=job.federation.timeout,
        train_config=config,
        evaluate_config=ConfigRecord(dict(config)),
        evaluate_fn=central_evaluation,
    )
    return history


def _job_from_context(context: Context) -> JobConfig:
    try:
        return JobConfig.model_validate(unflatten(dict(context.run_config)))
    except ValidationError as error:
        lines = describe_errors(error, JobConfig)
        raise ValueError("invalid run config:\n  " + "\n  ".join(lines)) from None


# Entry point named in pyproject's [tool.flwr.app.components] (`flwr run .`): the job comes
# from the run config (pyproject defaults, overridden with `--run-config`).
app = ServerApp()


@app.main()
def _main(grid: Grid, context: Context) -> None:
    run(_job_from_context(context), grid, JobHistory(), None, None)
