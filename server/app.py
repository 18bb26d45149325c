"""The coordinator's Flower ServerApp: the job's rounds (confide.server.strategy) with
central evaluation every round, each round recorded from the records the strategy returns
(confide.server.rounds).

Two entry points: `build_server_app` (simulation passes the job and collects the history) and
the module-level `app` that `flwr run` starts on a SuperLink. The latter reads the job from
the run config (`confide-server submit` puts it there as JSON) and writes the run's results
in the same format as a simulation: under the coordinator in its runs folder, without it in
`results/flwr-run-<id>/` or the run config's `results-dir` (`Deployment.results_directory`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.app.typing import MetricRecordValues
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from pydantic import ValidationError

from confide.common.config import describe_errors, unflatten
from confide.common.errors import (
    CheckpointError,
    DatasetError,
    JobFailed,
    JobStopped,
    ModelFileError,
    RegistryError,
    TooFewInstitutions,
)
from confide.server.checkpoint import (
    Checkpointer,
    Checkpointing,
    CheckpointStore,
    restore,
    resumption,
)
from confide.server.flower import RESULTS_ENV, STATE_ENV
from confide.server.history import GlobalModel, JobHistory, RoundObserver, RoundRecord
from confide.server.job import JobConfig, model_name
from confide.server.model_file import (
    Ancestor,
    ModelCard,
    fingerprint_test_set,
    load_into,
    model_for_run,
)
from confide.server.polling import PromptGrid
from confide.server.results import (
    Results,
    build_results,
    institution_row,
    privacy_document,
    write_results,
)
from confide.server.rounds import RoundRecorder, central_asked
from confide.server.strategy import ConfideStrategy
from confide.tasks.datasets import Dataset
from confide.tasks.metrics import MetricsFn, evaluate
from confide.tasks.registry import get_task
from confide.tasks.splits import split_test

if TYPE_CHECKING:
    import torch
    from sqlalchemy import Engine
    from torch import nn

    from confide.server.audit import AuditLog, Detail
    from confide.server.model_registry import ModelRegistry

# Run config keys `confide-server submit` sets.
JOB_KEY = "confide-job"
NAME_KEY = "confide-job-name"
# Run config key: where a run on a SuperLink without the coordinator writes its results
# (`Deployment.results_directory`); relative to the SuperLink's working directory.
RESULTS_KEY = "results-dir"
DEFAULT_RESULTS = "results"
# Run config key `confide-server resume` sets: the run whose job this run continues from its
# checkpoint (STATE/checkpoints/run-<id>.ckpt).
RESUME_KEY = "confide-resume"


def build_server_app(
    job: JobConfig,
    *,
    name: str = "job",
    history: JobHistory | None = None,
    observer: RoundObserver | None = None,
    test_set: Dataset | None = None,
    noise_seed: int | None = None,
    initial: Mapping[str, torch.Tensor] | None = None,
    checkpointing: Callable[[str], Checkpointing] | None = None,
    grid_wrapper: Callable[[Grid], Grid] | None = None,
    registered: Callable[[], dict[int, str]] | None = None,
) -> ServerApp:
    """A ServerApp running `job`; results accumulate in `history`, `observer` sees each round.

    `test_set` is the coordinator's held-out data for central evaluation; by default it is the
    task's held-out split (the same split simulated institutions exclude from training).
    `noise_seed` seeds central DP noise (a simulation's seed; None: the OS CSPRNG).
    `initial`: the weights to start from (`[model] init`), else the task's seeded model.
    `checkpointing`, given the Flower run's id, says where the job checkpoints and what it
    resumes (see `run`); the job's run identity is then its, else the Flower run's id.
    `grid_wrapper` wraps the grid the job runs on (a simulation's injected faults,
    confide.simulations.faults); None runs on Flower's own.
    `registered` names the nodes (node id -> institution, see `Roster`): a simulation
    passes its engine's mapping; None asks every node.
    """
    app = ServerApp()
    kept = history if history is not None else JobHistory()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        this_run = str(context.run_id)
        plan = checkpointing(this_run) if checkpointing is not None else None
        run(
            job,
            grid_wrapper(grid) if grid_wrapper is not None else grid,
            history=kept,
            observer=observer,
            test_set=test_set,
            name=name,
            noise_seed=noise_seed,
            registered=registered,
            initial=initial,
            identity=plan.run if plan is not None else this_run,
            checkpointing=plan,
        )

    return app


def run(
    job: JobConfig,
    grid: Grid,
    *,
    history: JobHistory,
    observer: RoundObserver | None = None,
    test_set: Dataset | None = None,
    name: str = "job",
    noise_seed: int | None = None,
    registered: Callable[[], dict[int, str]] | None = None,
    initial: Mapping[str, torch.Tensor] | None = None,
    identity: str | None = None,
    checkpointing: Checkpointing | None = None,
) -> JobHistory:
    """Run `job` on `grid`, recording every round in `history` from the records the strategy
    returns; `registered` names the enrolled institutions in deployment (see `Roster`).

    The job starts from `initial` (a saved model's weights, `[model] init`) if given, else
    from the task's model initialised by the job's seed. After each round `history.model`
    holds the global model, which the run's model file is written from.

    `identity` is the job's run identity, sent to institutions (`RoundInstructions.run`) to
    key their ledger entries. With `checkpointing`, the job's checkpoint is written after
    each round is recorded; if it names a checkpoint to resume, the job continues after that
    checkpoint's round k with its model, history, roster exclusions and central DP releases
    (and noise seed): rounds k+1..N run, none is evaluated or recorded twice."""
    test = test_set if test_set is not None else coordinator_test_set(job)
    task = get_task(job.task.name)
    model = task.build_model(job.task, shape=test.shape, classes=test.classes, seed=job.seed)
    resume = checkpointing.resume if checkpointing is not None else None
    if resume is not None:
        noise_seed = resume.noise_seed  # the first run's: the same noise for the same rounds
    elif initial is not None:
        load_into(model, initial, what=f"the starting model ({job.model.init})")
    confide = ConfideStrategy.for_job(job, history, noise_seed=noise_seed, registered=registered)
    start = ArrayRecord(model.state_dict())
    offset = 0
    labels = label_names(test)
    if resume is not None:
        offset = restore(resume, history=history, strategy=confide)
        start = resume.arrays()
        history.resumed.append(resumption(resume, checkpointing.this_run))  # type: ignore[union-attr]
        history.model = GlobalModel(offset, start, test.shape, labels, fingerprint_test_set(test))
        log(INFO, "resuming job %s after round %d of %d", name, offset, job.federation.rounds)
    strategy = RoundRecorder(confide, offset=offset)
    instructions = job.instructions(test.features, labels, name, shape=test.shape)
    if identity is not None:
        instructions = instructions.model_copy(update={"run": identity})
    config = ConfigRecord(instructions.to_config())
    checkpointer = None
    if checkpointing is not None:
        checkpointer = Checkpointer(
            checkpointing,
            job=job,
            name=name,
            history=history,
            strategy=confide,
            noise_seed=noise_seed,
            initial=start,
        )
    try:
        strategy.start(
            grid=grid,
            initial_arrays=start,
            num_rounds=job.federation.rounds - offset,
            timeout=job.federation.timeout,
            train_config=config,
            evaluate_config=ConfigRecord(dict(config)),
            evaluate_fn=CentralEvaluation(
                model,
                test,
                history=history,
                recorder=strategy,
                observer=observer,
                extra=task.metrics,
                checkpoint=checkpointer,
            ),
        )
    except JobStopped as stop:
        history.stopped = str(stop)
        log(INFO, "%s", stop)  # an expected end, reported in the results and summary
    return history


class CentralEvaluation:
    """Flower's `evaluate_fn`: scores the global model on the coordinator's test set and,
    after each round, records the round in `history` from what the strategy returned (read
    by `recorder`), shows the round to `observer`, then writes the job's `checkpoint`.

    Rounds are the job's (Flower's plus the recorder's offset): a resumed job's round 0 is
    not evaluated again, its initial metrics are the checkpoint's."""

    def __init__(
        self,
        model: nn.Module,
        test: Dataset,
        *,
        history: JobHistory,
        recorder: RoundRecorder,
        observer: RoundObserver | None,
        extra: MetricsFn | None = None,
        checkpoint: Callable[[int, ArrayRecord], None] | None = None,
    ) -> None:
        self.model = model
        self.test = test
        self.test_fingerprint = fingerprint_test_set(test)
        self.extra = extra  # the task's own metrics, added to each evaluation
        self.history = history
        self.recorder = recorder
        self.observer = observer
        self.checkpoint = checkpoint

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and self.recorder.offset:
            return None  # a resumed job: its starting model was evaluated by its first run
        server_round += self.recorder.offset
        self.model.load_state_dict(arrays.to_torch_state_dict())
        test = self.test
        metrics = evaluate(self.model, test.x, test.y, classes=test.classes, extra=self.extra)
        history = self.history
        history.model = GlobalModel(
            server_round, arrays, test.shape, label_names(test), self.test_fingerprint
        )
        if server_round == 0:
            history.initial_metrics = metrics
            return _metric_record(metrics)
        record = self.recorder.record(server_round, metrics, epsilon_max=history.epsilon_max)
        history.rounds.append(record)
        train = self.recorder.result.train_metrics_clientapp.get(server_round)
        if (asked := central_asked(train)) is not None:
            history.central_releases.append(asked)
        log(
            INFO,
            "round %d: accuracy %.4f, max epsilon %.3f",
            server_round,
            record.accuracy,
            record.epsilon_max,
        )
        # The observer first: in deployment it audits the round's refusals, which a resumed
        # job takes as audited once they are in the checkpoint.
        if self.observer is not None:
            self.observer(record, history)
        if self.checkpoint is not None:
            self.checkpoint(server_round, arrays)
        return _metric_record(metrics)


def _metric_record(metrics: Mapping[str, float]) -> MetricRecord:
    values: dict[str, MetricRecordValues] = dict(metrics)
    return MetricRecord(values)


def label_names(test: Dataset) -> list[str]:
    """The class names of the coordinator's test set (its indices when it has none): they
    define the global model's outputs and every institution's label encoding."""
    return list(test.label_names) or [str(k) for k in range(test.classes)]


def coordinator_test_set(job: JobConfig) -> Dataset:
    """The data the coordinator scores the global model on: the whole file for a task that
    reads one (the coordinator's own held-out file), else the task's held-out split (the
    examples simulated institutions never see). Its columns and class names define the
    global model's input width and label encoding."""
    if get_task(job.task.name).needs_path:
        return get_task(job.task.name).load(job.task, job.seed)
    return split_test(job.task, job.data, job.seed)[1]


def job_from_run_config(run_config: Mapping[str, object]) -> tuple[str, JobConfig]:
    """(name, job) from a run config: JSON under `confide-job`, else flat dotted keys (the
    defaults in the project's pyproject, for `flwr run .`; `results-dir` is not the job's)."""
    if JOB_KEY in run_config:
        tree = json.loads(str(run_config[JOB_KEY]))
    else:
        tree = unflatten({key: value for key, value in run_config.items() if key != RESULTS_KEY})
    name = str(run_config.get(NAME_KEY, "job"))
    try:
        return name, JobConfig.model_validate(tree)
    except ValidationError as error:
        lines = describe_errors(error, JobConfig)
        raise ValueError("invalid run config:\n  " + "\n  ".join(lines)) from None


def write_deployed_results(
    directory: Path,
    *,
    name: str,
    job: JobConfig,
    history: JobHistory,
    seconds: float,
    run: str,
    lineage: list[Ancestor] | None = None,
    register: Callable[[str, ModelCard, bytes], ModelCard] | None = None,
) -> Results:
    """results.json, job.toml, plots and the model of a finished deployed run (`run`: its
    id); `register` (the coordinator's registry) registers the model first, so the files
    written here name its version."""
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
    report = privacy_document(name, job, history, institutions=rows, simulated=False)
    document = build_results(
        name, job, history, institutions=rows, report=report, total_seconds=seconds
    )
    resolved = job.model_dump(mode="json", exclude_none=True)
    model = model_for_run(
        history, document, job=job, kind="deployment", run=run, lineage=lineage or []
    )
    if model is not None and register is not None:
        card, weights = model
        model = register(model_name(job), card, weights), weights
    return write_results(
        directory,
        document,
        history,
        config=("job.toml", resolved),
        privacy=report,
        model=model,
    )


class Deployment:
    """What the deployed ServerApp uses from the coordinator's state folder (named by
    `CONFIDE_STATE_DIR` in the SuperLink's environment): the enrolled institutions, the audit
    log and the results folder. Without it (`flwr run .` against a bare SuperLink), nodes
    are asked who they are, nothing is audited, and the results go to a folder of the run
    config's choosing (`results_directory`)."""

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

    def results_directory(self, run_id: int, run_config: Mapping[str, object]) -> Path:
        """Where run `run_id` writes its results, decided, like who names the nodes, by
        whether the SuperLink runs under the coordinator.

        Under the coordinator: `run-<id>` in the folder `CONFIDE_RESULTS_DIR` names (what
        `confide-server start` sets: STATE/runs), else in STATE/runs; the run config cannot
        move them (whoever submits a job does not choose where the coordinator writes).
        Without it (`flwr run .`, nodes named by themselves): `flwr-run-<id>` under the run
        config's `results-dir`, by default `results/` in the SuperLink's working directory
        (for `flwr run .`, where it was first started) — apart from any coordinator's runs.
        """
        coordinator = os.environ.get(RESULTS_ENV) or self._runs()
        if coordinator is not None:
            if RESULTS_KEY in run_config:
                log(WARNING, "run config %s ignored: the coordinator keeps results", RESULTS_KEY)
            return Path(coordinator) / f"run-{run_id}"
        chosen = Path(str(run_config.get(RESULTS_KEY, DEFAULT_RESULTS)))
        return (chosen / f"flwr-run-{run_id}").absolute()

    def _runs(self) -> Path | None:
        if self.state is None:
            return None
        from confide.server.settings import StateDir

        return StateDir(self.state).runs

    def starting_model(
        self, job: JobConfig, test: Dataset
    ) -> tuple[dict[str, torch.Tensor] | None, list[Ancestor]]:
        """The weights `[model] init` names (a registered version) and the lineage they bring;
        (None, []) without one. RegistryError if it cannot be used: a deployed job continues
        only a version of the coordinator's registry, never a file on some host."""
        from confide.server.model_file import check_continues, lineage_of

        reference = job.model.init
        if reference is None:
            return None, []
        if job.model.registered_init() is None:
            raise RegistryError(
                f"[model] init = {reference!r}: a deployed job starts from a registered "
                "version, NAME:VERSION (`confide-server models list`)"
            )
        registry = self.registry()
        if registry is None:
            raise RegistryError(
                f"[model] init = {reference!r} needs the coordinator's registry; this "
                "SuperLink was not started by `confide-server start`"
            )
        model, state = registry.load(reference)
        check_continues(model.card, job, what=reference, shape=test.shape, labels=label_names(test))
        return state, lineage_of(model.card, reference)

    def registry(self) -> ModelRegistry | None:
        """The coordinator's model registry (None without a state folder)."""
        if self.state is None or self._engine is None:
            return None
        from confide.server.model_registry import ModelRegistry
        from confide.server.settings import StateDir

        return ModelRegistry(StateDir(self.state), self._engine)

    def register(self, name: str, card: ModelCard, weights: bytes) -> ModelCard:
        """Register a run's model (audited); the card as registered. A registry that cannot
        take it (a disk, the database) costs the version, never the run's results: the
        failure is logged and audited, and the card returned unregistered."""
        from sqlalchemy.exc import SQLAlchemyError

        registry = self.registry()
        assert registry is not None  # only called with one (`_deployed_run`)
        try:
            registered = registry.register(name, card, weights)
        except (RegistryError, OSError, SQLAlchemyError) as error:
            log(WARNING, "the run's model was not registered: %s", error)
            self.audit("model.register_failed", model=name, run=card.run.run, reason=str(error))
            return card
        entry = registered.registry
        assert entry is not None
        self.audit(
            "model.registered",
            model=f"{entry.name}:{entry.version}",
            run=card.run.run,
            sha256=card.weights.sha256,
        )
        return registered

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

    def already_audited(self, history: JobHistory) -> None:
        """The refusals of `history` were audited (by the run that checkpointed it)."""
        self._audited = len(history.rejected)

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
    run_config = dict(context.run_config)
    name, job = _deployed_job(deployment, run_id, run_config)
    checkpointing = _checkpointing(deployment, run_id, run_config, name=name, job=job)
    identity = checkpointing.run if checkpointing is not None else str(run_id)
    if checkpointing is not None and checkpointing.resume is not None:
        deployment.already_audited(checkpointing.resume.history)
    try:
        test = coordinator_test_set(job)
        initial, lineage = deployment.starting_model(job, test)
    except (RegistryError, ModelFileError, DatasetError) as error:
        deployment.audit("run.failed", run=run_id, job=name, reason=str(error))
        raise JobFailed(f"job {name} failed: {error}") from None
    # A resumed job writes into its first run's folder: one job, one results folder.
    directory = deployment.results_directory(int(identity), run_config)
    history = JobHistory()
    started = time.perf_counter()
    _audited_run(
        deployment,
        run_id,
        grid,
        name=name,
        job=job,
        history=history,
        test=test,
        initial=initial,
        identity=identity,
        checkpointing=checkpointing,
    )
    if history.rounds:
        before = checkpointing.resume.seconds if checkpointing and checkpointing.resume else 0.0
        written = write_deployed_results(
            directory,
            name=name,
            job=job,
            history=history,
            seconds=before + time.perf_counter() - started,
            run=identity,
            lineage=lineage,
            register=deployment.register if deployment.registry() is not None else None,
        )
        log(INFO, "results written to %s", directory)
        if written.model is not None:
            log(INFO, "model %s", written.model.registered or directory / written.model.file)
        if checkpointing is not None:
            checkpointing.store.remove()  # the job ended: nothing to resume
    ending = "run.stopped" if history.stopped else "run.finished"
    deployment.audit(
        ending,
        run=run_id,
        job_run=identity if identity != str(run_id) else None,
        job=name,
        rounds=len(history.rounds),
        accuracy=history.rounds[-1].accuracy if history.rounds else None,
        reason=history.stopped,
    )


def _checkpointing(
    deployment: Deployment,
    run_id: int,
    run_config: Mapping[str, object],
    *,
    name: str,
    job: JobConfig,
) -> Checkpointing | None:
    """Where run `run_id` checkpoints (under the coordinator: STATE/checkpoints; a bare
    SuperLink has no place for the key, so none), and the checkpoint it resumes when the run
    config names one (`RESUME_KEY`, set by `confide-server resume`). JobFailed (audited) if
    that checkpoint cannot be used: none, another job's, another key, altered."""
    resumes = run_config.get(RESUME_KEY)
    if deployment.state is None:
        if resumes is not None:  # no key, no checkpoint: never silently start again
            raise JobFailed(
                f"{RESUME_KEY} = {resumes}: resuming needs the coordinator's state folder "
                f"({STATE_ENV}); start the SuperLink with `confide-server start`"
            )
        return None
    this_run = str(run_id)
    if resumes is None:
        return Checkpointing(
            CheckpointStore.for_run(deployment.state, this_run), this_run, this_run
        )
    identity = str(resumes)
    store = CheckpointStore.for_run(deployment.state, identity)
    try:
        if not identity.isdigit():
            raise CheckpointError(f"{RESUME_KEY} = {identity!r} names no run")
        checkpoint = store.load(identity)
        checkpoint.check_job(job)
        if checkpoint.round > job.federation.rounds:
            raise CheckpointError(f"run {identity} has more rounds than its job")
    except CheckpointError as error:
        deployment.audit("run.failed", run=run_id, job=name, reason=str(error))
        raise JobFailed(f"job {name} cannot resume run {identity}: {error}") from None
    return Checkpointing(store, identity, this_run, resume=checkpoint)


def _deployed_job(
    deployment: Deployment, run_id: int, run_config: Mapping[str, object]
) -> tuple[str, JobConfig]:
    """(name, job) of the run, or JobFailed (audited) if it must not or cannot run."""
    if JOB_KEY in run_config and deployment.state is None:
        # A job `confide-server submit` sent, on a SuperLink that was not started by
        # `confide-server start`: nodes could only be named from what they say. Refuse.
        raise JobFailed(
            f"the SuperLink's environment names no coordinator state folder ({STATE_ENV}); "
            "start it with `confide-server start`"
        )
    try:
        return job_from_run_config(run_config)
    except ValueError as error:
        deployment.audit("run.failed", run=run_id, reason=str(error))
        raise JobFailed(str(error)) from None


def _audited_run(
    deployment: Deployment,
    run_id: int,
    grid: Grid,
    *,
    name: str,
    job: JobConfig,
    history: JobHistory,
    test: Dataset,
    initial: Mapping[str, torch.Tensor] | None,
    identity: str,
    checkpointing: Checkpointing | None,
) -> None:
    """`run` with the deployment's roster; refusals audited as rounds end, failures audited
    and re-raised (TooFewInstitutions as one JobFailed line)."""

    def observe(record: RoundRecord, history: JobHistory) -> None:
        deployment.audit_refusals(run_id, history)

    # Flower's deployed grid waits 3 s between pulls of replies; see confide.server.polling.
    try:
        run(
            job,
            PromptGrid(grid),  # type: ignore[arg-type]
            history=history,
            observer=observe,
            name=name,
            registered=deployment.roster(),
            test_set=test,
            initial=initial,
            # Named to the institutions only when it is not the Flower run's own id (a
            # resumed job): they use that id by default, and an institution of an earlier
            # release refuses instructions with a key it does not know.
            identity=identity if identity != str(run_id) else None,
            checkpointing=checkpointing,
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
