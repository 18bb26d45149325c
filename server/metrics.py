"""The coordinator's `/metrics`: what `confide-server start` shows Prometheus.

The ServerApp runs in a process of its own (the SuperLink's SuperExec starts it), so nothing
is counted in memory here: every scrape reads the coordinator's state, as `confide-server
status` and `institutions list` do.

- Institutions: the coordinator's database (enrolled, revoked) and the SuperLink's node
  statuses (`flwr supernode list`): an institution is *online* when its enrolled node is
  `online` there, as `confide-server submit` counts them (Flower: a SuperNode that sent a
  heartbeat within its interval).
- Runs by state: the SuperLink's list of runs (`flwr ls`), states as Flower names them
  (`pending`, `starting`, `running`, `finished:completed`, `finished:failed`,
  `finished:stopped`).
- Each job's figures, labelled `run` with the job's run id (the first run's: a resumed job
  keeps its folder and its checkpoint's name): a finished job's from its `results.json`, a
  job in progress (or stopped mid-job, awaiting `resume`) from its checkpoint, which the
  ServerApp rewrites after every round (`STATE/checkpoints/run-<id>.ckpt`, read with the
  coordinator's checkpoint key, as `resume` reads it).

The two Flower queries run `flwr` (about 2 s of CPU each, up to `FLOWER_TIMEOUT_SECONDS` on
a busy host), so a scrape never waits for them: they are asked again in background threads
(`confide.common.refresh`) when their answer is older than `FLOWER_REFRESH_SECONDS`, and a
scrape shows the last answer with its age (`confide_superlink_last_answer_age_seconds`); a
question that failed shows as `confide_superlink_up 0`. The threads ask nothing more once the
endpoint stops (`CoordinatorCollector.close`).

Per-run series: every finished job would add its own (a histogram's 16 and each
institution's) for ever, so only jobs in progress (or awaiting resume) and the newest
`FINISHED_RUNS_SHOWN` finished ones (by their results' time) are exported; older ones stay
in their `results.json`. The files are parsed again only when they changed. The first scrape
imports the result models (torch among them): seconds, once. Every metric is documented in
docs/deployment.md ("Metrics"), which `METRICS` must match (a test checks both ways).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from confide.common.errors import ConfideError
from confide.common.refresh import Answer, Refreshed
from confide.server.settings import StateDir
from confide.server.state import InstitutionRow

if TYPE_CHECKING:
    from confide.server.checkpoint import Checkpoint
    from confide.server.results import Results

METRICS_PORT = 9464
FLOWER_REFRESH_SECONDS = 30.0
FLOWER_TIMEOUT_SECONDS = 20.0
# Finished jobs whose per-run series are exported, newest first (module docstring).
FINISHED_RUNS_SHOWN = 20
# Deployed rounds take seconds to minutes (docs/benchmarks.md).
ROUND_BUCKETS = (1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0, 600.0)
# Central DP's accountant (results.json's `institution_level.accountant`: always RDP).
CENTRAL_ACCOUNTANT = "rdp"
# Checkpoints' file suffix (confide.server.checkpoint.SUFFIX, not imported: see `RunReader`).
SUFFIX = ".ckpt"

# Every metric this collector exports: name (as exposed, with `_total` for counters) -> type.
METRICS = {
    "confide_institutions_enrolled": "gauge",
    "confide_institutions_revoked": "gauge",
    "confide_institutions_online": "gauge",
    "confide_institution_online": "gauge",
    "confide_superlink_up": "gauge",
    "confide_superlink_last_answer_age_seconds": "gauge",
    "confide_runs": "gauge",
    "confide_run_info": "gauge",
    "confide_run_rounds_completed": "gauge",
    "confide_round_duration_seconds": "histogram",
    "confide_updates_accepted_total": "counter",
    "confide_replies_refused_total": "counter",
    "confide_run_delta": "gauge",
    "confide_central_epsilon": "gauge",
    "confide_central_delta": "gauge",
    "confide_institution_epsilon": "gauge",
    "confide_institution_dataset_epsilon": "gauge",
    "confide_institution_dataset_delta": "gauge",
    "confide_institution_rounds_trained_total": "counter",
    "confide_run_files_unreadable": "gauge",
}


@dataclass(frozen=True)
class InstitutionFigures:
    """One institution's figures in one job, as its replies reported them."""

    name: str
    rounds_trained: int
    epsilon: float | None  # this job's, sample level, at the job's delta; None without DP
    accountant: str | None  # the accountant of `epsilon` (the job's); None without DP
    dataset_epsilon: float | None  # its ledger's over every job, at its own delta
    dataset_delta: float | None  # the delta `dataset_epsilon` is stated at
    dataset_accountant: str | None  # the accountant that composed `dataset_epsilon`


@dataclass(frozen=True)
class RunFigures:
    """One job's figures, from its results or its checkpoint (`record`)."""

    run: str
    job: str
    record: str  # "results" (finished) or "checkpoint" (in progress, or awaiting resume)
    round_seconds: list[float]
    updates_accepted: int
    refused: Counter[tuple[str, str]]  # (phase, who refused) -> replies
    delta: float | None  # the job's sample-level delta; None without DP
    central_epsilon: float | None
    central_delta: float | None
    institutions: list[InstitutionFigures]


def _number(value: Any) -> float | None:
    """A figure as a float: "unbounded" (a ledger after training without DP) is infinite."""
    if value is None:
        return None
    if value == "unbounded":
        return math.inf
    return float(value)


def from_results(run: str, results: Results) -> RunFigures:
    """A finished job's figures from its results.json."""
    central = results.privacy.institution_level
    return RunFigures(
        run=run,
        job=results.scenario,
        record="results",
        round_seconds=[entry.seconds for entry in results.rounds],
        updates_accepted=sum(entry.institutions_trained for entry in results.rounds),
        refused=Counter((row.phase, row.refused_by) for row in results.rejected_updates),
        delta=results.final.delta,
        # results.json holds an epsilon without a finite guarantee as null
        central_epsilon=(math.inf if central.epsilon is None else central.epsilon)
        if central
        else None,
        central_delta=central.delta if central else None,
        institutions=[
            InstitutionFigures(
                name=str(row.id),
                rounds_trained=row.rounds_trained,
                epsilon=row.epsilon,
                accountant=row.accountant,
                dataset_epsilon=_number(row.dataset_epsilon),
                dataset_delta=row.dataset_delta,
                dataset_accountant=row.dataset_accountant,
            )
            for row in results.institutions
        ],
    )


def from_checkpoint(checkpoint: Checkpoint) -> RunFigures:
    """A job's figures after its last completed round, from its checkpoint."""
    job = checkpoint.job_config()
    history = checkpoint.history
    dp = job.privacy.enabled
    central = [r.central_epsilon for r in history.rounds if r.central_epsilon is not None]
    return RunFigures(
        run=checkpoint.run,
        job=checkpoint.name,
        record="checkpoint",
        round_seconds=[record.seconds for record in history.rounds],
        updates_accepted=sum(record.trained for record in history.rounds),
        refused=Counter((str(row["phase"]), str(row["refused_by"])) for row in history.rejected),
        delta=job.privacy.delta if dp else None,
        central_epsilon=central[-1] if central else None,
        central_delta=job.central_privacy.delta if job.central_privacy.enabled else None,
        institutions=[
            InstitutionFigures(
                name=spend.institution,
                rounds_trained=spend.rounds_trained,
                epsilon=spend.epsilon if dp else None,
                accountant=job.privacy.accountant if dp else None,
                dataset_epsilon=spend.dataset_epsilon,
                dataset_delta=spend.dataset_delta,
                dataset_accountant=spend.dataset_accountant,
            )
            for spend in history.institutions.values()
        ],
    )


@dataclass
class _Cached:
    stamp: tuple[int, int]
    figures: RunFigures | None


@dataclass
class RunReader:
    """Every job's figures under a state folder, each file parsed again only when it
    changed (size or modification time). A file that cannot be read or opened is counted
    (`unreadable`), not raised: a scrape shows what it can. The result and checkpoint
    modules are imported on the first read (they bring torch), not with this one, which
    `confide-server start` imports."""

    directory: StateDir
    _cache: dict[Path, _Cached] = field(default_factory=dict)
    unreadable: int = 0

    def read(self) -> list[RunFigures]:
        """Every job in progress (or awaiting resume), and the newest `FINISHED_RUNS_SHOWN`
        finished ones by their results' modification time (module docstring); only those
        files are parsed."""
        from confide.server.results import RESULTS

        self.unreadable = 0
        results = _newest(self.directory.runs.glob(f"run-*/{RESULTS}"))
        finished = {path.parent.name.removeprefix("run-") for path in results}
        results = results[:FINISHED_RUNS_SHOWN]
        checkpoints = sorted((self.directory.root / "checkpoints").glob(f"run-*{SUFFIX}"))
        self._cache = {p: c for p, c in self._cache.items() if p in {*results, *checkpoints}}
        found: dict[str, RunFigures] = {}
        for path in results:
            run = path.parent.name.removeprefix("run-")
            if (figures := self._figures(path, run, self._results)) is not None:
                found[run] = figures
        for path in checkpoints:
            run = path.name.removeprefix("run-").removesuffix(SUFFIX)
            if run in finished:
                continue  # finished: its checkpoint is about to be removed
            if (figures := self._figures(path, run, self._checkpoint)) is not None:
                found[run] = figures
        return sorted(found.values(), key=lambda figures: _run_order(figures.run))

    def _figures(
        self, path: Path, run: str, parse: Callable[[str, Path], RunFigures]
    ) -> RunFigures | None:
        try:
            status = path.stat()
        except OSError:
            return None  # gone since it was listed (a finished job's checkpoint)
        stamp = (status.st_mtime_ns, status.st_size)
        cached = self._cache.get(path)
        if cached is None or cached.stamp != stamp:
            try:
                figures: RunFigures | None = parse(run, path)
            except (OSError, ValueError, ConfideError):
                figures = None  # pydantic's ValidationError is a ValueError
            cached = self._cache[path] = _Cached(stamp, figures)
        if cached.figures is None:
            self.unreadable += 1
        return cached.figures

    def _results(self, run: str, path: Path) -> RunFigures:
        from confide.server.results import Results

        return from_results(run, Results.model_validate_json(path.read_bytes()))

    def _checkpoint(self, run: str, _path: Path) -> RunFigures:
        from confide.server.checkpoint import CheckpointStore

        return from_checkpoint(CheckpointStore.for_run(self.directory.root, run).load(run))


def _run_order(run: str) -> tuple[int, str]:
    return (int(run), "") if run.isdigit() else (0, run)


def _newest(paths: Iterable[Path]) -> list[Path]:
    """`paths`, newest modification first (one `stat` each; one gone meanwhile is left out)."""
    stamped = []
    for path in paths:
        try:
            stamped.append((path.stat().st_mtime_ns, str(path), path))
        except OSError:
            continue
    return [path for *_, path in sorted(stamped, reverse=True)]


@dataclass(frozen=True)
class FlowerFacts:
    """What the SuperLink said: node id -> status, and its runs (`flwr ls` rows); None for
    what its last question did not answer. `age`: seconds since the older of the two last
    answers came, None until both came once."""

    statuses: dict[int, str] | None
    runs: list[dict[str, Any]] | None
    age: float | None = None


# What a `flwr` question raises when the SuperLink does not answer (not up yet, stopping,
# busy past the timeout), or answers what cannot be read.
FLOWER_PROBLEMS: tuple[type[BaseException], ...] = (ConfideError, OSError, ValueError, KeyError)


class FlowerSource:
    """The SuperLink's node statuses and runs, each asked again in a background thread when
    its answer is older than `refresh` seconds (`confide.common.refresh`): `facts()` returns
    at once."""

    def __init__(
        self,
        statuses: Callable[[], dict[int, str]],
        runs: Callable[[], list[dict[str, Any]]],
        refresh: float = FLOWER_REFRESH_SECONDS,
    ) -> None:
        self.statuses = Refreshed(
            statuses, refresh, name="metrics-node-statuses", expected=FLOWER_PROBLEMS
        )
        self.runs = Refreshed(runs, refresh, name="metrics-runs", expected=FLOWER_PROBLEMS)

    @classmethod
    def of(cls, directory: StateDir) -> FlowerSource:
        """The coordinator's own SuperLink, through `flwr` (`confide.server.flower`)."""
        from confide.server.enrollment import FlowerRegistrar

        def runs() -> list[dict[str, Any]]:
            from confide.server.jobs import runs

            return runs(directory)

        registrar = FlowerRegistrar(directory.flwr_home, timeout=FLOWER_TIMEOUT_SECONDS)
        return cls(registrar.statuses, runs)

    def facts(self) -> FlowerFacts:
        """The last answers, at once; a question that is due is asked in the background."""
        return _facts(self.statuses.latest(), self.runs.latest())

    def ask_now(self) -> FlowerFacts:
        """Both questions asked on this thread, and their answers kept (tests, and a caller
        that must have current answers)."""
        return _facts(self.statuses.refresh(), self.runs.refresh())

    def close(self) -> None:
        """Ask nothing more (the endpoint stopped)."""
        self.statuses.close()
        self.runs.close()


def _facts(statuses: Answer[dict[int, str]], runs: Answer[list[dict[str, Any]]]) -> FlowerFacts:
    ages = [statuses.age(), runs.age()]
    age = None if ages[0] is None or ages[1] is None else max(ages[0], ages[1])
    return FlowerFacts(statuses.value, runs.value, age)


class CoordinatorCollector(Collector):
    """The coordinator's metrics (module docstring), computed on each scrape; scrapes take
    turns."""

    def __init__(self, directory: StateDir, engine: Engine, flower: FlowerSource) -> None:
        self.directory = directory
        self.engine = engine
        self.flower = flower
        self.reader = RunReader(directory)
        self._lock = threading.Lock()

    def close(self) -> None:
        """The endpoint stopped: no more questions to the SuperLink."""
        self.flower.close()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            facts = self.flower.facts()
            yield from self._institutions(facts)
            yield from _run_states(facts)
            yield from _run_metrics(self.reader.read())
            yield GaugeMetricFamily(
                "confide_run_files_unreadable",
                "Results or checkpoint files of jobs that could not be read (damaged, "
                "another key, being replaced); their figures are missing.",
                value=self.reader.unreadable,
            )

    def _institutions(self, facts: FlowerFacts) -> Iterator[Metric]:
        try:
            with Session(self.engine) as session:
                rows = [
                    (row.name, int(row.node_id), row.revoked_at is not None)
                    for row in session.scalars(select(InstitutionRow))
                ]
        except SQLAlchemyError:
            rows = None
        if rows is not None:
            enrolled = sorted((name, node) for name, node, revoked in rows if not revoked)
            yield GaugeMetricFamily(
                "confide_institutions_enrolled",
                "Institutions enrolled and not revoked.",
                value=len(enrolled),
            )
            yield GaugeMetricFamily(
                "confide_institutions_revoked",
                "Institutions whose key was revoked.",
                value=sum(revoked for *_, revoked in rows),
            )
            if facts.statuses is not None:
                statuses = facts.statuses
                online = GaugeMetricFamily(
                    "confide_institution_online",
                    "1 if the enrolled institution's SuperNode is online at the SuperLink.",
                    labels=["institution"],
                )
                for name, node in enrolled:
                    online.add_metric([name], float(statuses.get(node) == "online"))
                yield GaugeMetricFamily(
                    "confide_institutions_online",
                    "Enrolled institutions whose SuperNode is online at the SuperLink.",
                    value=sum(statuses.get(node) == "online" for _, node in enrolled),
                )
                yield online
        yield GaugeMetricFamily(
            "confide_superlink_up",
            "1 if the SuperLink answered the last questions (node statuses and runs), asked "
            "in the background; 0 also until it first answers.",
            value=float(facts.statuses is not None and facts.runs is not None),
        )
        if facts.age is not None:
            yield GaugeMetricFamily(
                "confide_superlink_last_answer_age_seconds",
                "Seconds since the older of the SuperLink's last answers came: what the "
                "institutions' and runs' figures are as of.",
                value=facts.age,
            )


def _run_states(facts: FlowerFacts) -> Iterator[Metric]:
    if facts.runs is None:
        return
    states = Counter(str(run.get("status", "unknown")) for run in facts.runs)
    family = GaugeMetricFamily(
        "confide_runs", "Runs on the SuperLink by Flower's state.", labels=["state"]
    )
    for state, count in sorted(states.items()):
        family.add_metric([state], count)
    yield family


def _histogram(seconds: list[float]) -> tuple[list[tuple[str, float]], float]:
    buckets = [(str(bound), float(sum(s <= bound for s in seconds))) for bound in ROUND_BUCKETS]
    return [*buckets, ("+Inf", float(len(seconds)))], float(sum(seconds))


def _run_metrics(runs: list[RunFigures]) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "confide_run_info",
        "1 per job: its name, and whether its figures come from its results (finished) or "
        "its checkpoint (in progress, or stopped awaiting resume).",
        labels=["run", "job", "record"],
    )
    completed = GaugeMetricFamily(
        "confide_run_rounds_completed", "Rounds the job completed.", labels=["run"]
    )
    durations = HistogramMetricFamily(
        "confide_round_duration_seconds",
        "Wall-clock seconds of each completed round (round 1 includes start-up).",
        labels=["run"],
    )
    accepted = CounterMetricFamily(
        "confide_updates_accepted",
        "Institutions' updates that counted in an aggregation.",
        labels=["run"],
    )
    refused = CounterMetricFamily(
        "confide_replies_refused",
        "Replies refused, by phase and by who refused (reason: institution = its error "
        "reply, coordinator = an update it could not use, unanswered = no reply in time).",
        labels=["run", "phase", "reason"],
    )
    delta = GaugeMetricFamily(
        "confide_run_delta",
        "The job's sample-level delta: every confide_institution_epsilon of the run is at it.",
        labels=["run"],
    )
    central = GaugeMetricFamily(
        "confide_central_epsilon",
        "Institution-level (central DP) epsilon after the last round, at "
        "confide_central_delta, with the accountant named (rdp); +Inf: no finite guarantee.",
        labels=["run", "accountant"],
    )
    central_delta = GaugeMetricFamily(
        "confide_central_delta", "Central DP's delta.", labels=["run"]
    )
    epsilon = GaugeMetricFamily(
        "confide_institution_epsilon",
        "The institution's sample-level epsilon in this job, as it reported it, at "
        "confide_run_delta, with the job's accountant (named).",
        labels=["institution", "run", "accountant"],
    )
    dataset = GaugeMetricFamily(
        "confide_institution_dataset_epsilon",
        "The institution's ledger epsilon over every job on its data, as it last reported it, "
        "at confide_institution_dataset_delta, with its own accountant (named); +Inf after "
        "training without DP.",
        labels=["institution", "run", "accountant"],
    )
    dataset_delta = GaugeMetricFamily(
        "confide_institution_dataset_delta",
        "The delta confide_institution_dataset_epsilon is stated at: the institution's own "
        "(its max_delta), as it last reported it.",
        labels=["institution", "run"],
    )
    trained = CounterMetricFamily(
        "confide_institution_rounds_trained",
        "Rounds of this job whose update from the institution reached the coordinator.",
        labels=["institution", "run"],
    )
    for figures in runs:
        run = figures.run
        info.add_metric([run, figures.job, figures.record], 1.0)
        completed.add_metric([run], len(figures.round_seconds))
        buckets, total = _histogram(figures.round_seconds)
        durations.add_metric([run], buckets, total)
        accepted.add_metric([run], figures.updates_accepted)
        for phase, reason in sorted(figures.refused):
            refused.add_metric([run, phase, reason], figures.refused[(phase, reason)])
        if figures.delta is not None:
            delta.add_metric([run], figures.delta)
        if figures.central_epsilon is not None:
            central.add_metric([run, CENTRAL_ACCOUNTANT], figures.central_epsilon)
        if figures.central_delta is not None:
            central_delta.add_metric([run], figures.central_delta)
        for row in figures.institutions:
            trained.add_metric([row.name, run], row.rounds_trained)
            if row.epsilon is not None:
                epsilon.add_metric([row.name, run, row.accountant or ""], row.epsilon)
            if row.dataset_epsilon is not None:
                accountant = row.dataset_accountant or ""
                dataset.add_metric([row.name, run, accountant], row.dataset_epsilon)
            if row.dataset_delta is not None:
                dataset_delta.add_metric([row.name, run], row.dataset_delta)
    yield from (info, completed, durations, accepted, refused, delta, central, central_delta)
    yield from (epsilon, dataset, dataset_delta, trained)


def collector(directory: StateDir, engine: Engine) -> CoordinatorCollector:
    """The collector `confide-server start` serves: its own SuperLink and state folder."""
    return CoordinatorCollector(directory, engine, FlowerSource.of(directory))
