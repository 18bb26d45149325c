"""In deployment the coordinator names institutions from its own records of the keys they
enrolled with (node id -> name), never from what a node says, and samples no other node."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pytest
from flwr.app import Message
from flwr.common import Error

from confide.common.errors import TooFewInstitutions
from confide.privacy.config import PrivacyConfig, TrainConfig
from confide.privacy.policy import APP_REFUSED
from confide.server.app import run
from confide.server.history import JobHistory
from confide.server.job import FederationConfig, JobConfig
from confide.tasks.config import DataConfig, TaskConfig

pytestmark = pytest.mark.usefixtures("inside_a_run")


def job(rounds: int = 2, *, min_train: int = 2, min_available: int = 2) -> JobConfig:
    return JobConfig.model_validate(
        {
            "task": TaskConfig(name="digits"),
            "data": DataConfig(test_fraction=0.2, validation_fraction=0.1),
            "train": TrainConfig(batch_size=64, lr=1.0),
            "privacy": PrivacyConfig(noise_multiplier=1.0),
            "federation": FederationConfig(
                rounds=rounds,
                min_train=min_train,
                min_available=min_available,
                min_evaluate=0,
                fraction_evaluate=1.0,
                timeout=1.0,
            ),
        }
    )


class Counting:
    """Wraps a grid: counts the messages each node receives; `refusing` nodes answer every
    message with an app-check refusal (what confide's runner sends for a foreign app)."""

    def __init__(self, grid, refusing: Iterable[int] = (), *, reverse: bool = False) -> None:  # type: ignore[no-untyped-def]
        self.grid = grid
        self.received: Counter[int] = Counter()
        self.refusing = set(refusing)
        self.reverse = reverse  # replies in the opposite order, as if the last one were first

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):  # type: ignore[no-untyped-def]
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.received[node] += 1
            if node in self.refusing:
                error = Error(APP_REFUSED, f"node {node} refuses: not confide's ClientApp")
                reply = Message(error, reply_to=message)
                reply.metadata.__dict__["_src_node_id"] = node
                replies.append(reply)
            else:
                replies.extend(self.grid.send_and_receive([message], timeout=timeout))
        return replies[::-1] if self.reverse else replies

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.grid, name)


def run_job(config: JobConfig, grid, source, registered) -> JobHistory:  # type: ignore[no-untyped-def]
    history = JobHistory()
    run(
        config,
        grid,
        history=history,
        test_set=source.split().test,
        name="test-job",
        noise_seed=0,
        registered=registered,
    )
    return history


def test_institutions_are_named_from_the_registry_and_strangers_are_never_sampled(federation):
    grid, source = federation(institutions=3)
    counting = Counting(grid)
    enrolled = {100: "hospital-a", 101: "hospital-b"}  # node 102 registered no enrollment
    history = run_job(job(), counting, source, lambda: dict(enrolled))
    # The nodes' own ClientApps call themselves "0", "1", "2": the registry's names win.
    assert set(history.institutions) == {"hospital-a", "hospital-b"}
    assert [r.trained for r in history.rounds] == [2, 2]
    assert counting.received[102] == 0
    assert counting.received[100] > 0 and counting.received[101] > 0


def test_a_revoked_institution_is_not_sampled_from_the_next_round_on(federation):
    grid, source = federation(institutions=3)
    counting = Counting(grid)
    enrolled = {100: "hospital-a", 101: "hospital-b", 102: "hospital-c"}

    def registered() -> dict[int, str]:
        if counting.received[102] > 0:  # revoked once it has trained
            return {node: name for node, name in enrolled.items() if node != 102}
        return dict(enrolled)

    history = run_job(job(rounds=3), counting, source, registered)
    assert [r.trained for r in history.rounds] == [3, 2, 2]
    assert counting.received[102] == 1  # round 1's train message; revoked right after


def test_an_app_check_refusal_ends_the_institutions_part_in_the_job(federation):
    grid, source = federation(institutions=3)
    counting = Counting(grid, refusing=[102])
    enrolled = {100: "hospital-a", 101: "hospital-b", 102: "hospital-c"}
    history = run_job(job(rounds=3), counting, source, lambda: dict(enrolled))
    assert [r.trained for r in history.rounds] == [2, 2, 2]
    assert counting.received[102] == 1  # refused once, never asked again (train or evaluate)
    assert [(row["institution"], row["round"]) for row in history.rejected] == [("hospital-c", 1)]


def test_when_app_refusals_leave_too_few_the_job_stops_and_says_who_refused(federation):
    grid, source = federation(institutions=3)
    counting = Counting(grid, refusing=[101, 102])
    enrolled = {100: "hospital-a", 101: "hospital-b", 102: "hospital-c"}
    history = run_job(job(rounds=3), counting, source, lambda: dict(enrolled))
    # A round with one usable update of the two min_train asks for is not aggregated.
    assert history.rounds == [] or all(
        r.trained == 0 and r.note is not None and "not aggregated" in r.note for r in history.rounds
    )
    assert history.stopped is not None
    assert "hospital-b (its app check)" in history.stopped
    assert "hospital-c (its app check)" in history.stopped


def test_too_few_enrolled_institutions_online_fails_with_the_numbers(federation):
    grid, source = federation(institutions=3)
    with pytest.raises(TooFewInstitutions, match="only 1 of the 2 institutions"):
        run_job(job(), Counting(grid), source, lambda: {100: "hospital-a"})


def test_a_submitted_job_on_a_superlink_without_the_coordinators_state_fails_in_one_line():
    """Flower logs a ServerApp's exception with its traceback; confide's failures are one
    clear line, and a job never falls back to names the nodes give themselves."""
    import logging

    from flwr.app import Context, RecordDict

    from confide.server.app import JOB_KEY, Deployment, JobFailed, _deployed_run

    context = Context(
        run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={JOB_KEY: "{}"}
    )
    with pytest.raises(JobFailed) as failed:
        _deployed_run(Deployment(None), None, context)  # type: ignore[arg-type]
    shown = logging.Formatter().formatException(
        (type(failed.value), failed.value, failed.value.__traceback__)
    )
    assert "Traceback" not in shown
    assert shown.splitlines() == [f"confide.common.errors.JobFailed: {failed.value}"]
    assert "CONFIDE_STATE_DIR" in str(failed.value)


def test_the_jobs_record_of_refusals_does_not_depend_on_the_order_replies_arrive_in(federation):
    # Found comparing two runs of one scenario: refusals were recorded in arrival order.
    enrolled = {100: "hospital-a", 101: "hospital-b", 102: "hospital-c"}
    records = []
    for reverse in (False, True):
        grid, source = federation(institutions=3)
        counting = Counting(grid, refusing=[100, 102], reverse=reverse)
        history = run_job(job(rounds=1, min_train=1), counting, source, lambda: dict(enrolled))
        records.append([(r["institution"], r["round"], r["phase"]) for r in history.rejected])
    assert records[0] == records[1] == [("hospital-a", 1, "train"), ("hospital-c", 1, "train")]
