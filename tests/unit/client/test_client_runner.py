"""confide's runner: only confide's own ClientApp runs; any other app is refused and recorded.

FABs here are built by Flower's own builder (what `flwr run` sends) or, for what that builder
would never produce, zipped by hand.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.cli.build import build_fab_from_files
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.nodestate import NodeState
from flwr.supernode.start_client_internal import _insert_message
from helpers import free_port
from typer.testing import CliRunner

from confide.client.app_check import CLIENTAPP, AppRefused, check_app
from confide.client.cli import app as client_cli
from confide.client.data import STATE_DIR_KEY
from confide.client.institution import InstitutionConfig, InstitutionDir
from confide.client.runner import (
    FOREIGN_TASK,
    SECRET_FILE,
    Runner,
    acquire_client,
    acquire_request,
    write_secret,
)
from confide.client.served import SERVED_FILE
from confide.client.supernode import Ending, Seen, classify, supernode_command
from confide.common.errors import RunnerError
from confide.privacy.ledger import Ledger, moved_to
from confide.privacy.policy import ALREADY_SERVED, APP_REFUSED, REFUSED_BY_POLICY

pytestmark = pytest.mark.usefixtures("inside_a_run")
RUN_ID = 4242
CLIENT_TASK = TaskType.CLIENT_APP.value


def pyproject(clientapp: str = CLIENTAPP) -> bytes:
    """The pyproject `confide-server submit` writes, naming `clientapp`."""
    config = {
        "project": {"name": "job-a", "version": "1.0.0", "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "confide",
                    "components": {"serverapp": "confide.server.app:app", "clientapp": clientapp},
                    "config": {"confide.name": "a"},
                }
            }
        },
    }
    return tomli_w.dumps(config).encode()


def built(files: dict[str, bytes]) -> Fab:
    """A FAB as `flwr run` builds it from a folder holding `files`."""
    content = build_fab_from_files(files)[0]
    return Fab(hashlib.sha256(content).hexdigest(), content, {})


def zipped(members: dict[str, bytes]) -> Fab:
    """A FAB zipped by hand: what an attacker may send that Flower's builder never makes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    content = buffer.getvalue()
    return Fab(hashlib.sha256(content).hexdigest(), content, {})


def refusal(fab: Fab, declared: str | None = None) -> str:
    with pytest.raises(AppRefused) as refused:
        check_app(fab, fab.hash_str if declared is None else declared)
    return str(refused.value)


# -- the FAB check ---------------------------------------------------------------------


def test_confides_own_app_as_flwr_run_builds_it_is_accepted():
    fab = built({"pyproject.toml": pyproject()})
    with zipfile.ZipFile(io.BytesIO(fab.content)) as archive:
        assert sorted(archive.namelist()) == [".info/CONTENT", "pyproject.toml"]
    check_app(fab, fab.hash_str)


def test_an_app_naming_another_clientapp_is_refused():
    reason = refusal(built({"pyproject.toml": pyproject("evil.app:app")}))
    assert reason == (
        "its app names ClientApp 'evil.app:app'; this institution runs only confide.client.app:app"
    )


def test_an_app_carrying_code_beside_its_pyproject_is_refused():
    files = {"pyproject.toml": pyproject(), "evil/app.py": b"import os\nos.system('true')\n"}
    reason = refusal(built(files))  # confide's name, but code in the FAB all the same
    assert reason == "the app carries files other than pyproject.toml: evil/app.py"


@pytest.mark.parametrize(
    "member",
    ["confide/client/app.py", "site.pth", "lib/_evil.so", "README.md", ".info/EXTRA", "dir/"],
)
def test_any_member_but_the_pyproject_and_its_manifest_is_refused(member):
    reason = refusal(zipped({"pyproject.toml": pyproject(), member: b"x"}))
    assert reason.startswith("the app carries files other than pyproject.toml: ")
    assert member in reason


def test_names_in_a_refusal_are_few_and_clipped():
    members = {"pyproject.toml": pyproject()} | {f"m{i}/{'x' * 200}.py": b"" for i in range(5)}
    reason = refusal(zipped(members))
    assert reason.endswith("(and 2 more)") and len(reason) < 400


def test_bytes_that_do_not_hash_to_the_declared_hash_are_refused():
    fab = built({"pyproject.toml": pyproject()})
    message = "its app's bytes do not match the hash the run declares"
    assert refusal(fab, declared="0" * 64) == message
    swapped = Fab(fab.hash_str, fab.content + b"\0", {})  # content changed after hashing
    assert refusal(swapped) == message


def test_bytes_that_are_no_zip_archive_are_refused():
    content = b"#!/bin/sh\nrm -rf /\n"
    fab = Fab(hashlib.sha256(content).hexdigest(), content, {})
    assert refusal(fab) == "its app is not a readable FAB (zip archive)"


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ({".info/CONTENT": b""}, "its app has no pyproject.toml"),
        ({"pyproject.toml": b"[tool.flwr\n"}, "its app's pyproject.toml is not valid TOML"),
        ({"pyproject.toml": b"\xff\xfe"}, "its app's pyproject.toml is not valid TOML"),
        (
            {"pyproject.toml": b"[project]\nname = 'x'\n"},
            "its app names no ClientApp; this institution runs only confide.client.app:app",
        ),
        (
            {"pyproject.toml": pyproject(), ".info/CONTENT": b"pyproject.toml,00,8"},
            "its app's manifest (.info/CONTENT) does not describe its pyproject.toml",
        ),
    ],
)
def test_a_missing_or_invalid_pyproject_is_refused(members, expected):
    assert refusal(zipped(members)) == expected


def test_a_pyproject_that_inflates_past_the_bound_is_refused():
    bomb = pyproject() + b"#" + b" " * (2 << 20)
    assert "larger than" in refusal(zipped({"pyproject.toml": bomb}))


def test_a_name_given_twice_is_refused():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pyproject.toml", pyproject())
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("pyproject.toml", pyproject("evil.app:app"))
    content = buffer.getvalue()
    fab = Fab(hashlib.sha256(content).hexdigest(), content, {})
    assert refusal(fab) == "its app holds the same file name twice"


# -- the runner's decision -------------------------------------------------------------


def task_input(folder: Path, fab: Fab) -> tuple[Message, Context, Run]:
    message = Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)
    context = Context(
        run_id=RUN_ID,
        node_id=7,
        node_config={STATE_DIR_KEY: str(folder)},
        state=RecordDict(),
        run_config={},
    )
    run = Run.create_empty(RUN_ID)
    run.fab_hash = fab.hash_str
    return message, context, run


def runner(folder: Path, app: ClientApp | None = None) -> Runner:
    from confide.client.app import app as confide_app

    return Runner("hospital-a", folder, app or confide_app, "127.0.0.1:1")


def test_a_refused_app_gets_an_app_refused_reply_and_is_recorded_in_the_ledger(institution, caplog):
    fab = built({"pyproject.toml": pyproject("evil.app:app")})
    message, context, run = task_input(institution, fab)
    with caplog.at_level(logging.WARNING, logger="confide.client.runner"):
        outcome = runner(institution).decide(
            CLIENT_TASK, message, context=context, run=run, fab=fab
        )
    reason = (
        f"hospital-a refuses run {RUN_ID}: its app names ClientApp 'evil.app:app'; this "
        "institution runs only confide.client.app:app"
    )
    assert outcome.reply.has_error() and outcome.reply.error.code == APP_REFUSED
    assert outcome.reply.error.reason == reason
    assert (outcome.status, outcome.details) == (SubStatus.FAILED, reason)
    assert f"refused run {RUN_ID}" in caplog.text and fab.hash_str in caplog.text
    ledger = Ledger(institution)
    [entry] = ledger.entries()
    assert (entry.kind, entry.run) == ("refused-app", str(RUN_ID))
    assert json.loads(entry.note) == {
        "run": str(RUN_ID),
        "fab-hash": fab.hash_str,
        "reason": reason,
    }
    assert ledger.verify() == [] and ledger.spent(1e-5) == []


def test_a_refused_run_is_recorded_once_however_many_messages_it_sends(institution):
    fab = built({"pyproject.toml": pyproject(), "evil.py": b""})
    the_runner = runner(institution)
    for _ in range(3):
        message, context, run = task_input(institution, fab)
        assert (
            the_runner.decide(
                CLIENT_TASK, message, context=context, run=run, fab=fab
            ).reply.error.code
            == APP_REFUSED
        )
    assert [e.kind for e in Ledger(institution).entries()] == ["refused-app"]


def test_budget_verify_lists_the_refusal_and_passes(institution):
    fab = built({"pyproject.toml": pyproject("evil.app:app")})
    message, context, run = task_input(institution, fab)
    runner(institution).decide(CLIENT_TASK, message, context=context, run=run, fab=fab)
    result = CliRunner().invoke(client_cli, ["budget", "verify", "--dir", str(institution)])
    assert result.exit_code == 0, result.output
    assert "ledger intact: 1 entries" in result.output
    assert "refused to run a run's app" in result.output and "evil.app:app" in result.output
    budget = CliRunner().invoke(client_cli, ["budget", "--dir", str(institution), "--json"])
    [line] = json.loads(budget.output)
    assert budget.exit_code == 0 and (line["epsilon"], line["rounds"], line["jobs"]) == (0.0, 0, 0)


def test_a_refusal_recorded_after_a_move_leaves_the_ledger_moved(institution, tmp_path):
    ledger = Ledger(institution)
    ledger.note("moved", json.dumps({"to": str(tmp_path / "elsewhere")}))
    ledger.record_refusal(run="9", fab_hash="ab" * 32, reason="hospital-a refuses run 9: ...")
    assert moved_to(ledger.entries()) == str(tmp_path / "elsewhere")


def test_confides_app_is_run_in_process_and_replies(institution):
    fab = built({"pyproject.toml": pyproject()})
    message, context, run = task_input(institution, fab)
    outcome = runner(institution).decide(CLIENT_TASK, message, context=context, run=run, fab=fab)
    assert not outcome.reply.has_error()
    assert outcome.reply.content["identity"]["institution"] == "hospital-a"
    assert (outcome.status, outcome.details) == (SubStatus.COMPLETED, "")
    assert not Ledger(institution).exists()  # nothing refused, nothing trained


def test_a_failing_app_replies_without_its_detail_which_is_logged_here(institution, caplog):
    failing = ClientApp()

    @failing.query()
    def query(message: Message, context: Context) -> Message:
        raise ValueError(f"{institution}/data.csv: row 3 holds 0.4172")

    fab = built({"pyproject.toml": pyproject()})
    message, context, run = task_input(institution, fab)
    with caplog.at_level(logging.ERROR, logger="confide.client.runner"):
        outcome = runner(institution, failing).decide(
            CLIENT_TASK, message, context=context, run=run, fab=fab
        )
    assert outcome.reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    reason = outcome.reply.error.reason
    assert reason == (
        "hospital-a's ClientApp failed on a query message (ValueError); the detail is in the "
        "institution's log"
    )
    assert "0.4172" in caplog.text and str(institution) in caplog.text


def test_each_start_writes_a_new_private_secret(tmp_path):
    first = write_secret(tmp_path).read_bytes()
    path = write_secret(tmp_path)
    assert path == tmp_path / SECRET_FILE and path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_bytes()) == 32 and path.read_bytes() != first


# -- which SuperNode, which task type ---------------------------------------------------


def spy_app() -> tuple[ClientApp, list[Message]]:
    """A ClientApp that records the messages it is given (none must reach it here)."""
    app = ClientApp()
    seen: list[Message] = []

    @app.query()
    def query(message: Message, context: Context) -> Message:
        seen.append(message)
        return Message(RecordDict(), reply_to=message)

    return app, seen


def other_institution(tmp_path: Path) -> Path:
    """Another institution's folder on this host, whose data and ledger this runner can read."""
    folder = tmp_path / "hospital-b"
    folder.mkdir()
    InstitutionDir(folder).save(
        InstitutionConfig(
            name="hospital-b",
            node_id=8,
            superlink="127.0.0.1:1",
            enrollment="127.0.0.1:2",
            data=tmp_path / "data.csv",
            declared_examples=18,
        )
    )
    return folder


def test_a_task_naming_another_folder_is_refused_unrun_and_unrecorded(
    institution, tmp_path, caplog
):
    other = other_institution(tmp_path)
    app, seen = spy_app()
    fab = built({"pyproject.toml": pyproject()})  # confide's own app: refused all the same
    message, context, run = task_input(other, fab)
    with caplog.at_level(logging.ERROR, logger="confide.client.runner"):
        outcome = runner(institution, app).decide(
            CLIENT_TASK, message, context=context, run=run, fab=fab
        )
    assert outcome.reply.error.code == FOREIGN_TASK and outcome.status == SubStatus.FAILED
    reason = outcome.reply.error.reason
    assert reason == (
        "hospital-a's runner refuses the task: the SuperNode that handed it was not started "
        "for this institution"
    )
    assert str(other) in caplog.text and str(other) not in reason
    assert seen == []
    assert not Ledger(institution).exists() and not Ledger(other).exists()


@pytest.mark.parametrize("task_type", [CLIENT_TASK, TaskType.AGENT_APP.value])
def test_a_foreign_task_is_refused_before_its_app_or_type_can_write_a_ledger(
    institution, tmp_path, task_type
):
    fab = built({"pyproject.toml": pyproject("evil.app:app")})
    message, context, run = task_input(other_institution(tmp_path), fab)
    outcome = runner(institution).decide(task_type, message, context=context, run=run, fab=fab)
    assert outcome.reply.error.code == FOREIGN_TASK
    assert not Ledger(institution).exists()


@pytest.mark.parametrize("config", [{}, {STATE_DIR_KEY: ""}, {STATE_DIR_KEY: 7}])
def test_a_task_naming_no_folder_is_refused(institution, config):
    app, seen = spy_app()
    fab = built({"pyproject.toml": pyproject()})
    message, context, run = task_input(institution, fab)
    context.node_config = config
    outcome = runner(institution, app).decide(
        CLIENT_TASK, message, context=context, run=run, fab=fab
    )
    assert outcome.reply.error.code == FOREIGN_TASK and seen == []


def test_the_own_folder_by_another_path_is_the_own_folder(institution, tmp_path):
    (tmp_path / "link").symlink_to(institution)
    fab = built({"pyproject.toml": pyproject()})
    message, context, run = task_input(tmp_path / "link" / ".." / "link", fab)
    outcome = runner(institution).decide(CLIENT_TASK, message, context=context, run=run, fab=fab)
    assert outcome.status == SubStatus.COMPLETED, outcome.details


def test_the_runner_asks_for_every_task_type_flower_defines():
    asked = set(acquire_request().supported_task_types)
    assert asked == {task_type.value for task_type in TaskType}
    assert TaskType.AGENT_APP.value in asked


def test_an_agentapp_task_is_refused_and_recorded_even_with_confides_pyproject(institution):
    app, seen = spy_app()
    fab = built({"pyproject.toml": pyproject()})
    message, context, run = task_input(institution, fab)
    outcome = runner(institution, app).decide(
        TaskType.AGENT_APP.value, message, context=context, run=run, fab=fab
    )
    reason = (
        f"hospital-a refuses run {RUN_ID}: its app runs here as an AgentApp, not a ClientApp; "
        "this institution runs only confide.client.app:app"
    )
    assert (outcome.reply.error.code, outcome.reply.error.reason) == (APP_REFUSED, reason)
    assert outcome.status == SubStatus.FAILED and seen == []
    [entry] = Ledger(institution).entries()
    assert entry.kind == "refused-app" and json.loads(entry.note)["reason"] == reason


# Flower's own SuperNode Runtime API (its HTTP app, its in-memory NodeState), served in this
# process without a SuperLink: a message is stored as the SuperNode stores what it pulls.
NODE = 7
SECRET = b"the institution's superexec secret"


@dataclass
class RuntimeApi:
    state: NodeState
    address: str

    def deliver(self, task_type: str, folder: Path, fab: Fab) -> int:
        """A QUERY message of run RUN_ID, whose primary task type is `task_type`, for a
        SuperNode started with node config `confide-dir=folder`; the task's id."""
        run = Run.create_empty(RUN_ID)
        run.fab_hash, run.primary_task_type = fab.hash_str, task_type
        self.state.store_run(run)
        self.state.store_fab(fab)
        context = Context(
            run_id=RUN_ID,
            node_id=NODE,
            node_config={STATE_DIR_KEY: str(folder)},
            state=RecordDict(),
            run_config={},
        )
        self.state.set_run_series_context(run.series_id, context)
        message = Message(RecordDict(), dst_node_id=NODE, message_type=MessageType.QUERY)
        return self.insert(task_type, message, fab)

    def insert(self, task_type: str, message: Message, fab: Fab) -> int:
        """What the SuperNode does with a message it pulls from the SuperLink (a copy of one
        it saw before too, once it has forgotten it): a new task, and the message stored."""
        task_id = self.state.create_task(task_type=task_type, run_id=RUN_ID, fab_hash=fab.hash_str)
        _insert_message(message, self.state, self.state.object_store)
        return task_id

    def forget(self, message: Message, reply: Message) -> None:
        """What the SuperNode does once it sent `reply`: drops both (`_push_messages`)."""
        ids = [message.metadata.message_id, reply.metadata.message_id]
        self.state.delete_messages(message_ids=ids)
        self.state.object_store.delete(reply.metadata.message_id)

    def replies(self) -> list[Message]:
        return self.state.get_messages_legacy(run_ids=[RUN_ID], is_reply=True)

    def sub_status(self, task_id: int) -> str:
        [task] = self.state.get_tasks(task_ids=[task_id])
        return task.status.sub_status


def serve_runtime_api(secret: bytes | None) -> Iterator[RuntimeApi]:
    import uvicorn
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.main import create_app
    from flwr.supernode.nodestate import NodeStateFactory

    factory = NodeStateFactory(ObjectStoreFactory())
    factory.state().set_node_id(NODE)
    port = free_port()
    app = create_app(state_factory=factory, superexec_auth_secret=secret)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "no Runtime API"
        time.sleep(0.05)
    try:
        yield RuntimeApi(factory.state(), f"127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def supernode_api(monkeypatch) -> Iterator[RuntimeApi]:
    """The institution's SuperNode's Runtime API, which checks the SuperExec secret."""
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)  # the message's run
    yield from serve_runtime_api(SECRET)


@pytest.fixture
def impostor_api(monkeypatch) -> Iterator[RuntimeApi]:
    """A Runtime API started by someone else on the port: it checks no secret."""
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    yield from serve_runtime_api(None)


def take_one(api: RuntimeApi, the_runner: Runner, request: AcquireTaskRequest) -> bool:
    """One AcquireTask with `request`, and the task served if one came; whether one came."""
    acquire = acquire_client(api.address, SECRET)
    try:
        response = acquire.AcquireTask(request)
    finally:
        acquire.close()
    if not (response.HasField("task") and response.token):
        return False
    the_runner.serve_task(response.task, response.token)
    return True


def test_an_agentapp_run_is_taken_refused_and_answered_once(institution, supernode_api):
    app, seen = spy_app()
    the_runner = Runner("hospital-a", institution, app, supernode_api.address)
    fab = built({"pyproject.toml": pyproject()})
    task_id = supernode_api.deliver(TaskType.AGENT_APP.value, institution, fab)
    # Asked for ClientApp tasks only (as before), the SuperNode hands nothing: it would wait.
    clientapp_only = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    assert not take_one(supernode_api, the_runner, clientapp_only)
    assert take_one(supernode_api, the_runner, acquire_request())
    [reply] = supernode_api.replies()  # Flower adds no second ("AgentApp failed") reply
    assert reply.error.code == APP_REFUSED
    assert reply.error.reason.startswith(f"hospital-a refuses run {RUN_ID}: its app runs here as")
    assert supernode_api.sub_status(task_id) == SubStatus.FAILED
    assert seen == []
    assert [e.kind for e in Ledger(institution).entries()] == ["refused-app"]


def test_confides_app_is_served_through_the_runtime_api(institution, supernode_api):
    the_runner = runner(institution)
    the_runner.address = supernode_api.address
    fab = built({"pyproject.toml": pyproject()})
    task_id = supernode_api.deliver(CLIENT_TASK, institution, fab)
    assert take_one(supernode_api, the_runner, acquire_request())
    [reply] = supernode_api.replies()  # stored without its content (in the object store)
    assert not reply.has_error()
    assert supernode_api.sub_status(task_id) == SubStatus.COMPLETED


def test_a_train_message_delivered_again_is_not_trained_or_recorded_twice(
    institution, supernode_api
):
    the_runner = runner(institution)
    the_runner.address = supernode_api.address
    fab = built({"pyproject.toml": pyproject()})
    supernode_api.deliver(CLIENT_TASK, institution, fab)  # the run's context and FAB
    assert take_one(supernode_api, the_runner, acquire_request())
    supernode_api.replies()  # the query's
    message = train_message()
    first = supernode_api.insert(CLIENT_TASK, message, fab)
    assert take_one(supernode_api, the_runner, acquire_request())
    [trained] = supernode_api.replies()
    assert not trained.has_error() and supernode_api.sub_status(first) == SubStatus.COMPLETED
    supernode_api.forget(message, trained)

    again = supernode_api.insert(CLIENT_TASK, message, fab)  # the same message, again
    assert take_one(supernode_api, the_runner, acquire_request())
    [refused] = supernode_api.replies()  # the first two were read already
    assert refused.error.code == ALREADY_SERVED
    assert refused.error.reason == (
        f"hospital-a already answered this train message of run {RUN_ID}; a copy delivered "
        "again is not run twice"
    )
    assert supernode_api.sub_status(again) == SubStatus.FAILED
    assert [e.kind for e in Ledger(institution).entries()] == ["spend"]


def test_a_restarted_runner_still_refuses_a_message_served_before(institution):
    fab = built({"pyproject.toml": pyproject()})
    message, context, run = task_input(institution, fab)
    first = runner(institution).decide(CLIENT_TASK, message, context=context, run=run, fab=fab)
    again = runner(institution).decide(CLIENT_TASK, message, context=context, run=run, fab=fab)
    assert not first.reply.has_error()
    assert again.reply.error.code == ALREADY_SERVED and again.status == SubStatus.FAILED
    path = institution / SERVED_FILE
    assert path.stat().st_mode & 0o777 == 0o600


def test_an_unreadable_record_of_served_messages_stops_the_runner(institution):
    (institution / SERVED_FILE).write_text('{"message_ids": 7}')
    with pytest.raises(RunnerError, match="not a record of served messages"):
        runner(institution)


def test_a_process_on_the_port_cannot_have_another_folder_trained(
    institution, tmp_path, impostor_api, caplog
):
    other = other_institution(tmp_path)
    app, seen = spy_app()
    the_runner = Runner("hospital-a", institution, app, impostor_api.address)
    task_id = impostor_api.deliver(CLIENT_TASK, other, built({"pyproject.toml": pyproject()}))
    with caplog.at_level(logging.ERROR, logger="confide.client.runner"):
        assert take_one(impostor_api, the_runner, acquire_request())
    [reply] = impostor_api.replies()
    assert reply.error.code == FOREIGN_TASK and str(other) not in reply.error.reason
    assert impostor_api.sub_status(task_id) == SubStatus.FAILED
    assert seen == [] and f"it names folder {str(other)!r}" in caplog.text
    assert not Ledger(institution).exists() and not Ledger(other).exists()


# -- what confide's ClientApp tells the coordinator of local problems ---------------------


def train_message(server_round: int = 1, noise_multiplier: float = 1.0) -> Message:
    from confide.privacy.config import PrivacyConfig, TrainConfig
    from confide.privacy.instructions import RoundInstructions
    from confide.tasks.config import TaskConfig
    from confide.tasks.registry import get_task

    instructions = RoundInstructions(
        task=TaskConfig(name="digits"),
        train=TrainConfig(batch_size=4, lr=0.1),
        privacy=PrivacyConfig(noise_multiplier=noise_multiplier),
        rounds=3,
        features=1,
        labels=["0", "1"],
    )
    model = get_task("digits").build_model(instructions.task, shape=(1,), classes=2, seed=0)
    from flwr.app import ArrayRecord

    config = ConfigRecord(instructions.to_config() | {"server-round": server_round})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def reply_to(folder: Path, message: Message) -> Message:
    from confide.client.app import build_client_app

    _, context, _ = task_input(folder, built({"pyproject.toml": pyproject()}))
    return build_client_app()(message, context)


def test_data_that_cannot_be_read_is_reported_without_its_path_or_values(
    institution, tmp_path, caplog
):
    (tmp_path / "data.csv").write_text("a,label\n0,0\n0.4172secret,1\n")
    with caplog.at_level(logging.ERROR, logger="confide.client.app"):
        reply = reply_to(institution, train_message())
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    reason = reply.error.reason
    assert "hospital-a" in reason and "its data could not be read" in reason
    assert "0.4172secret" not in reason and str(tmp_path) not in reason
    assert "0.4172secret" in caplog.text  # the detail stays on this host


def test_missing_data_is_reported_without_its_path(institution, tmp_path):
    (tmp_path / "data.csv").unlink()
    reply = reply_to(institution, train_message())
    assert "its data could not be read" in reply.error.reason
    assert str(tmp_path) not in reply.error.reason and "data.csv" not in reply.error.reason


def test_unreadable_settings_are_reported_without_their_path(institution):
    (institution / "institution.toml").write_text("name = [")
    query = Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)
    reason = reply_to(institution, query).error.reason
    assert reason.startswith("the institution cannot answer a query message: its settings")
    assert str(institution) not in reason


def test_a_ledger_that_fails_verification_is_reported_without_its_path(institution, caplog):
    import sqlite3

    assert not reply_to(institution, train_message(1)).has_error()
    with sqlite3.connect(Ledger(institution).path) as connection:
        connection.execute("UPDATE entries SET steps = 1")
    with caplog.at_level(logging.ERROR, logger="confide.client.app"):
        reason = reply_to(institution, train_message(2)).error.reason
    assert reason.startswith("hospital-a cannot train round 2: its ledger failed verification")
    assert str(institution) not in reason and "ledger.sqlite" not in reason
    assert str(institution) in caplog.text


def test_a_moved_ledger_is_reported_without_its_destination(institution, tmp_path, caplog):
    assert not reply_to(institution, train_message(1)).has_error()
    Ledger(institution).note("moved", json.dumps({"to": str(tmp_path / "elsewhere")}))
    with caplog.at_level(logging.WARNING, logger="confide.client.app"):
        reason = reply_to(institution, train_message(2)).error.reason
    assert reason == (
        "hospital-a refuses round 2: its ledger was moved to another folder; train from there"
    )
    assert str(tmp_path / "elsewhere") in caplog.text


# -- how `confide-client start` reads the SuperNode's ending --------------------------------

# What Flower 1.41's SuperNode prints (tests/integration/test_institution_runner.py runs it).
STARTED = "INFO :      Starting Flower SuperNode\n"
CONNECTED = "INFO :      SuperNode ID: 8107355486107016537\n"
GRACEFUL = "INFO :      SuperNode terminated gracefully.\n"
REFUSED = (
    "ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
    "[code: 2004] Failed to activate SuperNode.\n"
)


def seen(*lines: str) -> Seen:
    printed = Seen()
    for line in "".join(lines).splitlines():
        printed.read(line)
    return printed


@pytest.mark.parametrize(
    ("code", "printed", "stopping", "ending"),
    [
        (0, (STARTED, CONNECTED, GRACEFUL), False, Ending.REVOKED),  # exits 0 by itself
        (1, (STARTED, REFUSED), False, Ending.REFUSED),  # status 1, not 305
        (0, (STARTED, CONNECTED, GRACEFUL), True, Ending.STOPPED),  # SIGTERM from start
        (-9, (STARTED, CONNECTED), False, Ending.FAILED),
        (1, (STARTED,), False, Ending.FAILED),
    ],
)
def test_the_supernodes_ending_is_read_from_what_it_prints(code, printed, stopping, ending):
    assert classify(code, seen(*printed), stopping=stopping) is ending


def test_the_supernode_runs_no_app_process_and_takes_the_runners_secret(institution):
    secret = write_secret(institution)
    command = supernode_command(InstitutionDir(institution), secret)
    after = {command[i]: command[i + 1] for i in range(1, len(command) - 1)}
    assert after["--isolation"] == "process"
    assert after["--superexec-auth-secret-file"] == str(secret)
    assert (after["--host"], after["--port"]) == ("127.0.0.1", "9094")


def test_a_round_the_limits_refuse_is_recorded_once_per_run_in_the_ledger(institution):
    fab = built({"pyproject.toml": pyproject()})
    _, context, run = task_input(institution, fab)
    # sigma 0.01 over the job's 3 rounds spends far past the default limit (epsilon 10).
    the_runner = runner(institution)
    message = train_message(2, noise_multiplier=0.01)
    outcome = the_runner.decide(CLIENT_TASK, message, context=context, run=run, fab=fab)
    assert outcome.reply.error.code == REFUSED_BY_POLICY
    again = train_message(3, noise_multiplier=0.01)  # a coordinator that keeps asking
    the_runner.decide(CLIENT_TASK, again, context=context, run=run, fab=fab)
    [entry] = Ledger(institution).entries()
    assert (entry.kind, entry.run, entry.round) == ("refused-round", str(RUN_ID), 2)
    assert json.loads(entry.note)["reason"] == outcome.reply.error.reason
    assert Ledger(institution).verify() == [] and Ledger(institution).spent(1e-5) == []
