"""The dashboard's page and /api/state over a real state directory: what a finished deployed
run, the audit log and the institutions' record hold is what it serves, every epsilon with its
delta and an infinite one as "unbounded", every value from the state is escaped, serving
changes nothing in the state directory and never holds up an audit append, the log and
checkpoints are read again only when they changed, and only its own hosts are served (an
IPv6 literal included)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy import update
from sqlalchemy.orm import Session
from test_server_deployed_results import RUN_CONFIG, PushPull, context

from confide.common.errors import StateError
from confide.privacy.config import CentralPrivacyConfig, PrivacyConfig, TrainConfig
from confide.server._audit_store import AuditStore
from confide.server.app import Deployment, _deployed_run
from confide.server.audit import AuditLog
from confide.server.checkpoint import Checkpoint, CheckpointStore, job_json, job_sha256
from confide.server.dashboard import CONTENT_SECURITY_POLICY, create_app, host_name, render_page
from confide.server.dashboard_state import Snapshot, StateReader
from confide.server.flower import RESULTS_ENV, STATE_ENV
from confide.server.history import InstitutionSpend, JobHistory, RoundRecord
from confide.server.institutions import record_enrollment
from confide.server.job import FederationConfig, JobConfig
from confide.server.settings import StateDir
from confide.server.state import AuditRow, open_database
from confide.tasks.config import DataConfig, TaskConfig

HOSTILE = '<script>alert("x")</script>'


@pytest.fixture
def coordinator(state_dir: StateDir, monkeypatch: pytest.MonkeyPatch) -> StateDir:
    """A coordinator state with institutions 0, 1 and 2 enrolled as the in-process grid's
    nodes 100, 101 and 102, and one audit entry."""
    monkeypatch.delenv(RESULTS_ENV, raising=False)
    monkeypatch.delenv(STATE_ENV, raising=False)
    engine = open_database(state_dir.database_url(state_dir.load_settings()))
    for index in range(3):
        record_enrollment(engine, name=str(index), node_id=100 + index, public_key=b"k%d" % index)
    AuditLog(state_dir, engine).append("token.created", actor="operator:test", institution="0")
    engine.dispose()
    return state_dir


@contextmanager
def serving(directory: StateDir, *, poll_seconds: float = 2.0) -> Iterator[str]:
    """The dashboard of `directory` served by uvicorn on a free port of 127.0.0.1 in a thread,
    as `confide-server dashboard` serves it; its URL. Stopped on leaving."""
    app = create_app(StateReader(directory, live_status=False), poll_seconds=poll_seconds)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        listener.close()


@contextmanager
def client(directory: StateDir) -> Iterator[httpx.Client]:
    with serving(directory) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http


def files(root: Path) -> dict[str, str]:
    """Every file under `root` with the hash of its content."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.usefixtures("inside_a_run")
def test_a_finished_run_is_served_as_its_results_say_and_nothing_changes(
    coordinator: StateDir, federation
):
    grid, _ = federation(state="ledgers")
    deployment = Deployment(coordinator.root)
    try:
        _deployed_run(deployment, PushPull(grid), context(RUN_CONFIG, run_id=7))  # type: ignore[arg-type]
    finally:
        deployment.close()
    results = json.loads((coordinator.runs / "run-7" / "results.json").read_text())
    before = files(coordinator.root)
    with client(coordinator) as dashboard:
        state = Snapshot.model_validate_json(dashboard.get("/api/state").text)
        page = dashboard.get("/")
    assert files(coordinator.root) == before  # read-only: no file written, created or changed

    assert [i.name for i in state.institutions] == ["0", "1", "2"]
    assert {i.status for i in state.institutions} == {"unknown"}  # no coordinator running
    (run,) = state.runs
    assert (run.run, run.job, run.status, run.dp) == ("7", "job", "finished", True)
    assert [(r.round, r.accuracy, r.epsilon_max) for r in run.rounds] == [
        (r["round"], r["accuracy"], r["epsilon_max"]) for r in results["rounds"]
    ]
    assert sorted((s.institution, s.epsilon) for s in run.institutions) == sorted(
        (row["id"], row["epsilon"]) for row in results["institutions"]
    )
    # The ServerApp audited its model and the run's end, newest first; the log verifies.
    assert state.audit.intact is True and state.audit.problems == []
    actions = ["run.finished", "model.registered", "token.created"]
    assert [e.action for e in state.audit.entries] == actions
    assert state.audit.total == 3 and state.problems == []

    assert page.status_code == 200 and page.headers["content-security-policy"] == (
        CONTENT_SECURITY_POLICY
    )
    assert 'data-run="7"' in page.text and f"{results['rounds'][0]['accuracy']:.4f}" in page.text


def test_values_from_the_state_are_escaped_in_the_page(state_dir: StateDir):
    engine = open_database(state_dir.database_url(state_dir.load_settings()))
    record_enrollment(engine, name=HOSTILE, node_id=5, public_key=b"k")
    AuditLog(state_dir, engine).append(
        "round.refused", actor="institution:x", reason='<img src=x onerror="alert(1)">'
    )
    engine.dispose()
    with client(state_dir) as dashboard:
        page = dashboard.get("/").text
        state = dashboard.get("/api/state").json()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "reason=&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    # The JSON carries the text as it is: the page's script sets it as text, never as HTML.
    assert state["institutions"][0]["name"] == HOSTILE


def test_a_changed_audit_entry_shows_as_a_damaged_log(coordinator: StateDir):
    engine = open_database(coordinator.database_url(coordinator.load_settings()))
    with Session(engine) as session, session.begin():
        session.execute(update(AuditRow).where(AuditRow.seq == 1).values(actor="someone-else"))
    engine.dispose()
    with client(coordinator) as dashboard:
        audit = dashboard.get("/api/state").json()["audit"]
        page = dashboard.get("/").text
    assert audit["intact"] is False
    assert any("entry 1 (token.created) does not match its MAC" in p for p in audit["problems"])
    assert 'data-intact="damaged"' in page


def test_runs_known_only_from_the_audit_log_show_as_submitted_or_failed(coordinator: StateDir):
    engine = open_database(coordinator.database_url(coordinator.load_settings()))
    log = AuditLog(coordinator, engine)
    log.append("job.submitted", actor="operator:test", run=11, job="waiting")
    log.append("job.submitted", actor="operator:test", run=12, job="broken")
    log.append("run.failed", actor="coordinator", run=12, job="broken", reason="no test set")
    # A job whose run failed and that a new run resumes is the first run's, going on again.
    log.append("job.submitted", actor="operator:test", run=13, job="resumed")
    log.append("run.failed", actor="coordinator", run=13, job="resumed", reason="killed")
    log.append("run.resumed", actor="operator:test", run=14, resumes=13, job="resumed")
    engine.dispose()
    with client(coordinator) as dashboard:
        runs = {run["run"]: run for run in dashboard.get("/api/state").json()["runs"]}
    assert [runs[r]["status"] for r in ("11", "12", "13")] == ["submitted", "failed", "submitted"]
    assert runs["12"]["detail"] == "no test set" and list(runs) == ["13", "12", "11"]


def test_only_its_own_hosts_and_reading_are_served(coordinator: StateDir):
    with client(coordinator) as dashboard:
        assert dashboard.get("/api/state", headers={"host": "attacker.example"}).status_code == 400
        assert dashboard.post("/api/state").status_code == 405
        script = dashboard.get("/static/dashboard.js")
        assert script.status_code == 200 and "textContent" in script.text
        assert dashboard.get("/static/uPlot.iife.min.js").status_code == 200
        assert dashboard.get("/static/../dashboard.py").status_code == 404


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("[::1]:9190", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("LocalHost:9190", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1", None),
        ("[::1]x", None),
        ("localhost:x", None),
    ],
)
def test_a_host_header_names_its_host_without_port_or_brackets(header: str, name: str | None):
    assert host_name(header) == name


def test_an_ipv6_literal_and_the_local_names_are_served_and_other_hosts_refused(
    coordinator: StateDir,
):
    with serving(coordinator) as url, httpx.Client(timeout=30) as http:
        port = url.rsplit(":", 1)[1]
        for host in (f"[::1]:{port}", f"127.0.0.1:{port}", f"localhost:{port}"):
            response = http.get(f"{url}/api/state", headers={"host": host})
            assert response.status_code == 200, host
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        for host in (f"evil.example:{port}", f"[::2]:{port}", "["):
            assert http.get(f"{url}/api/state", headers={"host": host}).status_code == 400, host


@pytest.mark.usefixtures("inside_a_run")
def test_every_epsilon_is_served_with_its_delta_and_an_infinite_one_as_unbounded(
    coordinator: StateDir, federation
):
    grid, _ = federation(state="ledgers")
    central = RUN_CONFIG | {"central_privacy.enabled": True, "central_privacy.delta": 1e-6}
    deployment = Deployment(coordinator.root)
    try:
        _deployed_run(deployment, PushPull(grid), context(central, run_id=7))  # type: ignore[arg-type]
    finally:
        deployment.close()
    with client(coordinator) as dashboard:
        (finite,) = dashboard.get("/api/state").json()["runs"]
    assert isinstance(finite["institution_level_epsilon"], float)
    assert (finite["delta"], finite["central_delta"]) == (1e-5, 1e-6)
    assert all(s["dataset_delta"] == 1e-5 for s in finite["institutions"])

    # results.json writes an infinite epsilon (no finite guarantee at this noise) as null.
    path = coordinator.runs / "run-7" / "results.json"
    results = json.loads(path.read_text())
    results["privacy"]["institution_level"]["epsilon"] = None
    for entry in results["rounds"]:
        entry["central_epsilon"] = None
    path.write_text(json.dumps(results))
    with client(coordinator) as dashboard:
        (run,) = dashboard.get("/api/state").json()["runs"]
        page = dashboard.get("/").text
    assert run["institution_level_epsilon"] == "unbounded" and run["central_delta"] == 1e-6
    assert [r["central_epsilon"] for r in run["rounds"]] == ["unbounded"] * len(run["rounds"])
    assert "institution-level DP, ε unbounded (no finite guarantee), δ = 1e-06" in page
    assert "<th>central ε (δ = 1e-06)</th>" in page and "<th>ε max (δ = 1e-05)</th>" in page
    assert "<th>ε (this run, δ = 1e-05)</th>" in page
    assert "<td>unbounded</td>" in page
    ledger = run["institutions"][0]["dataset_epsilon"]
    assert f"<td>{ledger:.3f} (δ = 1e-05)</td>" in page


def _job(rounds: int) -> JobConfig:
    return JobConfig(
        task=TaskConfig(name="digits"),
        data=DataConfig(test_fraction=0.2, validation_fraction=0.1),
        train=TrainConfig(batch_size=64),
        privacy=PrivacyConfig(noise_multiplier=1.0),
        central_privacy=CentralPrivacyConfig(enabled=True, delta=1e-6),
        federation=FederationConfig(rounds=rounds, min_train=2, min_available=3),
    )


def _checkpoint(directory: StateDir, done: int) -> None:
    """Run 9's checkpoint after round `done` of 3, as its ServerApp writes it: its central
    epsilon and institution 0's ledger are infinite (no finite guarantee)."""
    job = _job(3)
    history = JobHistory(
        initial_metrics={"accuracy": 0.1},
        rounds=[
            RoundRecord(
                round=r,
                metrics={"accuracy": 0.5, "loss": 1.0},
                epsilon_max=0.5 * r,
                seconds=1.0,
                trained=2,
                central_epsilon=math.inf,
            )
            for r in range(1, done + 1)
        ],
        institutions={
            "0": InstitutionSpend(
                institution="0",
                epsilon=0.5,
                rounds_trained=done,
                dataset_epsilon=math.inf,
                dataset_delta=1e-5,
            )
        },
    )
    checkpoint = Checkpoint(
        name="job", run="9", job=job_json(job), job_sha256=job_sha256(job), round=done,
        names=[], model="", history=history,
    )  # fmt: skip
    CheckpointStore.for_run(directory.root, "9").save(checkpoint)


def test_a_running_job_is_read_again_only_when_its_checkpoint_changed(
    coordinator: StateDir, monkeypatch: pytest.MonkeyPatch
):
    loads: list[str] = []
    load = CheckpointStore.load

    def counted(self: CheckpointStore, run: str) -> Checkpoint:
        loads.append(run)
        return load(self, run)

    monkeypatch.setattr(CheckpointStore, "load", counted)
    _checkpoint(coordinator, done=1)
    reader = StateReader(coordinator, live_status=False)
    try:
        first, again = reader.snapshot(), reader.snapshot()
        assert loads == ["9"] and first.runs == again.runs
        _checkpoint(coordinator, done=2)  # the next round's: replaced
        (run,) = reader.snapshot().runs
    finally:
        reader.close()
    assert loads == ["9", "9"] and (run.status, len(run.rounds)) == ("running", 2)
    # Infinity reaches the page as "unbounded", never as null ("no DP").
    state = json.loads(Snapshot(**{**again.model_dump(), "runs": [run]}).model_dump_json())
    (shown,) = state["runs"]
    assert shown["institution_level_epsilon"] == "unbounded" and shown["central_delta"] == 1e-6
    assert [r["central_epsilon"] for r in shown["rounds"]] == ["unbounded", "unbounded"]
    assert shown["institutions"][0]["dataset_epsilon"] == "unbounded"
    assert shown["institutions"][0]["dataset_delta"] == 1e-5
    page = render_page(Snapshot.model_validate(state))
    assert "ε unbounded (no finite guarantee), δ = 1e-06" in page
    assert "<td>unbounded (δ = 1e-05)</td>" in page


def test_serving_holds_up_no_audit_append_and_reads_the_log_again_only_when_it_grew(
    coordinator: StateDir, monkeypatch: pytest.MonkeyPatch
):
    """The dashboard verifies the log under a shared lock, taken only while it reads the
    rows (another reader is not kept waiting, an append only that long), and only when a
    new entry arrived; an append made while a request is served completes at once."""
    verifies: list[bool] = []
    verify = AuditLog.verify

    def counted(self: AuditLog, *, shared: bool = False) -> list[str]:
        verifies.append(shared)
        return verify(self, shared=shared)

    monkeypatch.setattr(AuditLog, "verify", counted)
    reading, go = threading.Event(), threading.Event()
    rows = AuditStore.rows

    def held(self: AuditStore, *, actions=None):  # type: ignore[no-untyped-def]
        if actions is None and threading.current_thread() is not threading.main_thread():
            reading.set()  # verifying, under the lock
            assert go.wait(30)
        return rows(self, actions=actions)

    engine = open_database(coordinator.database_url(coordinator.load_settings()))
    log = AuditLog(coordinator, engine)
    before = files(coordinator.root)
    with serving(coordinator) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/api/state").json()["audit"]["intact"] is True
        assert http.get("/api/state").json()["audit"]["total"] == 1
        assert verifies == [True]  # nothing new: not verified again

        monkeypatch.setattr(AuditStore, "rows", held)
        log.append("token.created", actor="operator:test", institution="1")
        answer: list[httpx.Response] = []
        request = threading.Thread(target=lambda: answer.append(http.get("/api/state")))
        request.start()
        assert reading.wait(30)
        lock = os.open(coordinator.audit_lock, os.O_RDONLY)
        try:  # another reader takes the lock at once; a writer waits for this read
            with pytest.raises(BlockingIOError):
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            os.close(lock)
        appended: list[int] = []
        append = threading.Thread(
            target=lambda: appended.append(
                log.append("token.created", actor="operator:test", institution="2").seq
            )
        )
        append.start()
        go.set()
        append.join(30)
        request.join(30)
        assert appended == [3] and answer[0].status_code == 200
        monkeypatch.setattr(AuditStore, "rows", rows)
        audit = http.get("/api/state").json()["audit"]
    engine.dispose()
    assert audit["intact"] is True and audit["total"] == 3 and audit["entries"][0]["seq"] == 3
    assert verifies == [True, True, True]
    assert set(files(coordinator.root)) == set(before)  # the dashboard created no file


def test_an_audit_append_completes_while_a_request_is_being_served(
    coordinator: StateDir, monkeypatch: pytest.MonkeyPatch
):
    inside, go = threading.Event(), threading.Event()
    institutions = StateReader._institutions

    def slow(self: StateReader, problems: list[str]):  # type: ignore[no-untyped-def]
        inside.set()
        assert go.wait(30)
        return institutions(self, problems)

    monkeypatch.setattr(StateReader, "_institutions", slow)
    engine = open_database(coordinator.database_url(coordinator.load_settings()))
    with serving(coordinator) as url, httpx.Client(base_url=url, timeout=30) as http:
        answer: list[httpx.Response] = []
        request = threading.Thread(target=lambda: answer.append(http.get("/api/state")))
        request.start()
        try:
            assert inside.wait(30)
            started = time.monotonic()
            entry = AuditLog(coordinator, engine).append("token.created", actor="operator:test")
            assert entry.seq == 2 and time.monotonic() - started < 5
        finally:
            go.set()
            request.join(30)
    engine.dispose()
    assert answer[0].status_code == 200


def test_a_folder_that_is_no_state_directory_is_refused(tmp_path: Path):
    with pytest.raises(StateError, match="not a coordinator state directory"):
        StateReader(StateDir(tmp_path))
