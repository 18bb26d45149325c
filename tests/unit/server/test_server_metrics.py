"""The coordinator's /metrics, computed from its state folder: the institutions in its
database and the SuperLink's statuses (asked in the background: a scrape never waits for
them), and each job's figures from the checkpoint the real ServerApp logic writes after each
round, then from the results it writes at the end (the newest finished jobs only)."""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import Engine

from confide.common.errors import FlowerError
from confide.common.metrics import Endpoint, exposure_warning, serve
from confide.privacy.config import CentralPrivacyConfig, PrivacyConfig, TrainConfig
from confide.server import metrics
from confide.server.app import run, write_deployed_results
from confide.server.checkpoint import Checkpointing, CheckpointStore
from confide.server.history import JobHistory
from confide.server.institutions import record_enrollment, revoke
from confide.server.job import FederationConfig, JobConfig
from confide.server.metrics import METRICS, CoordinatorCollector, FlowerSource
from confide.server.settings import StateDir
from confide.server.state import open_database
from confide.tasks.config import DataConfig, TaskConfig

pytestmark = pytest.mark.usefixtures("inside_a_run")

RUN = "7"
STATUSES = {100: "online", 101: "offline", 102: "online"}
RUNS = [
    {"run-id": 7, "status": "running"},
    {"run-id": 5, "status": "finished:completed"},
    {"run-id": 6, "status": "finished:completed"},
    {"run-id": 4, "status": "finished:failed"},
]


def job() -> JobConfig:
    return JobConfig(
        task=TaskConfig(name="digits"),
        data=DataConfig(test_fraction=0.2, validation_fraction=0.1),
        train=TrainConfig(batch_size=64, lr=1.0),
        privacy=PrivacyConfig(noise_multiplier=1.0, delta=1e-5),
        central_privacy=CentralPrivacyConfig(
            enabled=True, noise_multiplier=0.8, clipping_norm=5.0, delta=1e-6
        ),
        federation=FederationConfig(
            rounds=2, min_train=2, min_available=3, min_evaluate=0, fraction_evaluate=0.0
        ),
    )


class SuperLinkRevoking:
    """The SuperLink's side of a revocation (unregistering the node), which this test does
    not run."""

    def unregister(self, node_id: int) -> None:
        return None

    def statuses(self) -> dict[int, str]:
        return {}


@pytest.fixture
def engine(state_dir: StateDir) -> Iterator[Engine]:
    """The coordinator's database: three institutions enrolled (their node ids are those of
    the in-process grid), one revoked."""
    engine = open_database(state_dir.database_url(state_dir.load_settings()))
    for index, name in enumerate(("hospital-a", "hospital-b", "hospital-c", "clinic-d")):
        record_enrollment(engine, name=name, node_id=100 + index, public_key=name.encode())
    revoke(engine, SuperLinkRevoking(), "clinic-d")
    yield engine
    engine.dispose()


def scrape(collector: CoordinatorCollector) -> dict[str, list[Sample]]:
    """Every sample of one scrape, by sample name (a counter's end in `_total`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    (found,) = [s for s in samples[name] if labels.items() <= s.labels.items()]
    return float(found.value)


def flower(statuses: dict[int, str] = STATUSES) -> FlowerSource:
    """The SuperLink's answers (the integration test asks a real one), asked once now and
    not again during the test."""
    source = FlowerSource(lambda: dict(statuses), lambda: list(RUNS), refresh=3600.0)
    source.ask_now()
    return source


def run_job(state_dir: StateDir, federation) -> JobHistory:  # type: ignore[no-untyped-def]
    """Run the job to its end with the coordinator's checkpointing, as the deployed ServerApp
    does, leaving its checkpoint (the state between its last round and its results); node
    102 never answers."""
    grid, source = federation()
    grid.silent = {102}
    history = JobHistory()
    store = CheckpointStore.for_run(state_dir.root, RUN)
    run(
        job(),
        grid,
        history=history,
        test_set=source.split().test,
        name="digits-metrics",
        identity=RUN,
        checkpointing=Checkpointing(store, RUN, RUN),
    )
    return history


def test_institutions_enrolled_revoked_and_online_come_from_the_database_and_the_superlink(
    state_dir: StateDir, engine: Engine
):
    samples = scrape(CoordinatorCollector(state_dir, engine, flower()))
    assert value(samples, "confide_institutions_enrolled") == 3
    assert value(samples, "confide_institutions_revoked") == 1
    assert value(samples, "confide_institutions_online") == 2
    online = {s.labels["institution"]: s.value for s in samples["confide_institution_online"]}
    assert online == {"hospital-a": 1.0, "hospital-b": 0.0, "hospital-c": 1.0}
    assert value(samples, "confide_superlink_up") == 1
    assert value(samples, "confide_runs", state="finished:completed") == 2
    assert value(samples, "confide_runs", state="running") == 1
    assert value(samples, "confide_run_files_unreadable") == 0


def test_a_superlink_that_does_not_answer_shows_as_down_without_guessing_who_is_online(
    state_dir: StateDir, engine: Engine
):
    def unreachable() -> dict[int, str]:
        raise FlowerError("the SuperLink did not answer within 20s")

    source = FlowerSource(unreachable, lambda: list(RUNS), refresh=3600.0)
    source.ask_now()
    samples = scrape(CoordinatorCollector(state_dir, engine, source))
    assert value(samples, "confide_superlink_up") == 0
    assert "confide_superlink_last_answer_age_seconds" not in samples  # never answered
    assert value(samples, "confide_institutions_enrolled") == 3
    assert "confide_institutions_online" not in samples
    assert "confide_institution_online" not in samples


def test_a_job_in_progress_is_read_from_its_checkpoint_and_a_finished_one_from_its_results(
    state_dir: StateDir, engine: Engine, federation
):
    history = run_job(state_dir, federation)
    collector = CoordinatorCollector(state_dir, engine, flower())
    during = scrape(collector)
    assert value(during, "confide_run_info", run=RUN, job="digits-metrics") == 1
    assert during["confide_run_info"][0].labels["record"] == "checkpoint"

    finish(state_dir, history)
    after = scrape(collector)
    assert after["confide_run_info"][0].labels["record"] == "results"
    # The same figures either way, and the ones the job recorded.
    for samples in (during, after):
        assert value(samples, "confide_run_rounds_completed", run=RUN) == 2
        assert value(samples, "confide_round_duration_seconds_count", run=RUN) == 2
        total = value(samples, "confide_round_duration_seconds_sum", run=RUN)
        assert total == pytest.approx(sum(r.seconds for r in history.rounds), abs=1e-3)
        assert value(samples, "confide_round_duration_seconds_bucket", run=RUN, le="+Inf") == 2
        assert value(samples, "confide_updates_accepted_total", run=RUN) == 4  # 2 of 3, twice
        refused = value(
            samples, "confide_replies_refused_total", run=RUN, phase="train", reason="unanswered"
        )
        assert refused == 2  # node 102, each round
        assert value(samples, "confide_run_delta", run=RUN) == 1e-5
        assert value(samples, "confide_central_delta", run=RUN) == 1e-6
        central = value(samples, "confide_central_epsilon", run=RUN, accountant="rdp")
        assert central == pytest.approx(history.rounds[-1].central_epsilon, rel=1e-9)
        trained = {
            s.labels["institution"]: s.value
            for s in samples["confide_institution_rounds_trained_total"]
        }
        assert trained == {"0": 2, "1": 2, "2": 0}  # "2" was asked and never answered
        for name in ("0", "1"):
            labels = {"institution": name, "run": RUN}
            spend = history.institutions[name]
            # Every epsilon names its accountant and has its delta beside it.
            epsilon = value(samples, "confide_institution_epsilon", **labels, accountant="rdp")
            assert epsilon == pytest.approx(spend.epsilon, rel=1e-9)
            assert epsilon > 0
            accountant = str(spend.dataset_accountant)
            dataset = value(
                samples, "confide_institution_dataset_epsilon", **labels, accountant=accountant
            )
            assert math.isfinite(dataset) and dataset >= epsilon
            dataset_delta = value(samples, "confide_institution_dataset_delta", **labels)
            assert dataset_delta == spend.dataset_delta is not None


def finish(state_dir: StateDir, history: JobHistory) -> None:
    """The job's results, as the deployed ServerApp writes them at its end."""
    write_deployed_results(
        state_dir.runs / f"run-{RUN}",
        name="digits-metrics",
        job=job(),
        history=history,
        seconds=sum(r.seconds for r in history.rounds),
        run=RUN,
    )


def test_only_the_newest_finished_jobs_are_exported_and_every_job_in_progress(
    state_dir: StateDir, engine: Engine, federation, monkeypatch: pytest.MonkeyPatch
):
    history = run_job(state_dir, federation)
    finish(state_dir, history)
    # Two more finished jobs (copies of its results), each finished later than the one before.
    first = state_dir.runs / f"run-{RUN}"
    for copy in ("8", "9"):
        shutil.copytree(first, state_dir.runs / f"run-{copy}")
    now = time.time()
    for offset, finished in enumerate((RUN, "8", "9")):
        os.utime(state_dir.runs / f"run-{finished}" / "results.json", (now, now + offset * 10))
    # And one in progress: a checkpoint without results.
    checkpoint = CheckpointStore.for_run(state_dir.root, RUN).load(RUN)
    CheckpointStore.for_run(state_dir.root, "10").save(checkpoint.model_copy(update={"run": "10"}))

    def runs(samples: dict[str, list[Sample]]) -> set[str]:
        return {s.labels["run"] for s in samples["confide_run_info"]}

    assert metrics.FINISHED_RUNS_SHOWN == 20
    assert runs(scrape(CoordinatorCollector(state_dir, engine, flower()))) == {RUN, "8", "9", "10"}
    monkeypatch.setattr(metrics, "FINISHED_RUNS_SHOWN", 2)
    samples = scrape(CoordinatorCollector(state_dir, engine, flower()))
    assert runs(samples) == {"8", "9", "10"}  # 7 finished first; 10 is in progress
    for name in ("confide_round_duration_seconds_count", "confide_institution_epsilon"):
        assert {s.labels["run"] for s in samples[name]} == {"8", "9", "10"}, name


def test_a_checkpoint_that_does_not_open_is_counted_unreadable_not_raised(
    state_dir: StateDir, engine: Engine, federation
):
    run_job(state_dir, federation)
    (state_dir.root / "checkpoint.key").write_bytes(b"\0" * 32)  # another key
    samples = scrape(CoordinatorCollector(state_dir, engine, flower()))
    assert value(samples, "confide_run_files_unreadable") == 1
    assert "confide_run_info" not in samples
    assert value(samples, "confide_institutions_enrolled") == 3


def test_a_scrape_does_not_wait_for_a_slow_superlink_and_shows_its_last_answer_and_age(
    state_dir: StateDir, engine: Engine
):
    """`flwr` may take up to its timeout on a busy host: the scrape serves the last answer
    at once, asks again in the background, and shows the SuperLink down once a question
    fails."""
    release, asked = threading.Event(), threading.Event()
    answers: list[object] = [dict(STATUSES)]

    def statuses() -> dict[int, str]:
        asked.set()
        release.wait(30)
        answer = answers[0]
        if isinstance(answer, Exception):
            raise answer
        return dict(STATUSES)

    release.set()
    source = FlowerSource(statuses, lambda: list(RUNS), refresh=0.0)
    source.ask_now()
    collector = CoordinatorCollector(state_dir, engine, source)
    release.clear()
    asked.clear()
    begun = time.monotonic()
    samples = scrape(collector)  # starts a question that hangs until released
    assert time.monotonic() - begun < 5
    assert asked.wait(10)
    assert value(samples, "confide_superlink_up") == 1
    assert value(samples, "confide_institutions_online") == 2
    age = value(samples, "confide_superlink_last_answer_age_seconds")
    assert 0 <= age < 30
    answers[0] = FlowerError("the SuperLink did not answer within 20s")
    release.set()
    source.statuses.wait(10)
    down = scrape(collector)
    assert value(down, "confide_superlink_up") == 0
    assert "confide_institution_online" not in down
    # The age of the last answer that came, still growing.
    assert value(down, "confide_superlink_last_answer_age_seconds") >= age
    # Stopped with the endpoint: no question is asked any more.
    collector.close()
    source.statuses.wait(10)
    asked.clear()
    scrape(collector)
    assert not asked.wait(0.5)


def test_every_exported_metric_is_listed_with_its_type(state_dir: StateDir, engine, federation):
    run_job(state_dir, federation)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoordinatorCollector(state_dir, engine, flower()))
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    exported = {
        family.name + ("_total" if family.type == "counter" else ""): family.type
        for family in families
    }
    assert exported == METRICS


def test_the_endpoint_serves_the_collector_over_http_and_releases_its_port(
    state_dir: StateDir, engine: Engine
):
    port = free_port()
    server = serve(CoordinatorCollector(state_dir, engine, flower()), Endpoint("127.0.0.1", port))
    try:
        assert server.url == f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(server.url, timeout=30) as reply:
            text = reply.read().decode()
    finally:
        server.stop()
    assert "confide_institutions_enrolled 3.0" in text
    with pytest.raises(OSError):  # nothing listens any more
        urllib.request.urlopen(server.url, timeout=5)


def test_metrics_are_documented_in_the_deployment_guide():
    guide = (Path(__file__).resolve().parents[3] / "docs" / "deployment.md").read_text()
    for name in METRICS:
        assert f"`{name}`" in guide, name


def test_start_refuses_a_taken_metrics_port_before_anything_starts(state_dir: StateDir):
    import socket

    from typer.testing import CliRunner

    from confide.server.cli import app
    from confide.server.settings import ServerSettings

    state_dir.save_settings(
        ServerSettings(bind="127.0.0.1", superlink_port=free_port(), enrollment_port=free_port())
    )
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = CliRunner().invoke(
            app, ["start", "--dir", str(state_dir.root), "--metrics-port", str(port)]
        )
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert f"port {port} for the coordinator's metrics (127.0.0.1:{port})" in said
    assert "--metrics-port 0" in said and "listening" not in said
    assert not state_dir.pid_file.exists() and not (state_dir.root / "superlink.db").exists()


def test_an_endpoint_beyond_loopback_is_warned_about():
    warning = exposure_warning("the coordinator", Endpoint("0.0.0.0", 9464))
    assert warning is not None and "authenticates no one" in warning and "0.0.0.0" in warning
    for quiet in (Endpoint("127.0.0.1", 9464), Endpoint("::1", 9464), Endpoint("localhost", 1)):
        assert exposure_warning("the coordinator", quiet) is None
    assert exposure_warning("the coordinator", Endpoint("0.0.0.0", 0)) is None  # serves none
