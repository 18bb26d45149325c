"""`confide-client start` against a real SuperLink (TLS, node auth): only confide's own
ClientApp runs at the institution; revocation and activation refusals are told apart; the
SuperNode and the runner do not outlive `start`, however it ends.

The runs are started with `flwr run` from small app folders. Their ServerApp is a probe
installed on the coordinator's side only (on the SuperLink's PYTHONPATH): it sends one query
message to every node and writes the replies to a JSON file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from helpers import (
    Started,
    alive,
    bare_superlink,
    cli,
    confide,
    environment,
    free_port,
    openssh_key,
    spawned_by,
    wait_until,
)

from confide.client.institution import InstitutionConfig, InstitutionDir
from confide.client.runner import SECRET_FILE, acquire_client, write_secret
from confide.client.supernode import supernode_command
from confide.privacy.ledger import Ledger
from confide.privacy.policy import APP_REFUSED
from confide.server.enrollment import FlowerRegistrar

pytestmark = pytest.mark.slow
PROBE = """
import json, os, time
from pathlib import Path
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    nodes = []
    while not nodes and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    replies = []
    for reply in grid.send_and_receive(messages, timeout=60):
        if reply.has_error():
            replies.append({"error": [reply.error.code, reply.error.reason]})
        else:
            replies.append({"identity": dict(reply.content["identity"])})
    Path(os.environ["PROBE_OUT"], f"run-{context.run_id}.json").write_text(json.dumps(replies))
"""
# A foreign ClientApp: it leaves a marker if it is imported or run at the institution.
EVIL = """
import os
from pathlib import Path
from flwr.clientapp import ClientApp

MARKER = Path({marker!r})
if Path(os.environ.get("FLWR_HOME", "")).parent.name == {institution!r}:
    MARKER.write_text("imported at the institution")
app = ClientApp()


@app.query()
def query(message, context):
    MARKER.write_text("run at the institution")
    return message
"""


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """A bare SuperLink (TLS, SuperNode auth) that can run the probe ServerApp."""
    state = tmp_path_factory.mktemp("coordinator")
    (state / "probe").mkdir()
    (state / "probe" / "probe_server.py").write_text(PROBE)
    (state / "out").mkdir()
    env = {"PYTHONPATH": str(state / "probe"), "PROBE_OUT": str(state / "out")}
    with bare_superlink(state, env) as port:
        yield {"state": state, "port": port, "registrar": FlowerRegistrar(state / "flwr")}


def institution(superlink, tmp_path: Path, name: str) -> tuple[Path, int]:
    """An institution's folder as `join` leaves it (its key registered); its node id."""
    folder = tmp_path / name
    folder.mkdir()
    private, public = openssh_key()
    (folder / "institution.key").write_bytes(private)
    (folder / "institution.key").chmod(0o600)
    (folder / "institution.pub").write_bytes(public)
    shutil.copy(superlink["state"] / "ca.pem", folder / "ca.pem")
    node_id = superlink["registrar"].register(public, name)
    data = tmp_path / f"{name}.csv"
    data.write_text("a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(20)))
    config = InstitutionConfig(
        name=name,
        node_id=node_id,
        superlink=f"127.0.0.1:{superlink['port']}",
        enrollment="127.0.0.1:1",
        data=data,
        port=free_port(),
        declared_examples=18,
    )
    InstitutionDir(folder).save(config)
    return folder, node_id


def start(folder: Path) -> Started:
    """`confide-client start --dir FOLDER`."""
    return confide("confide-client start", "--dir", str(folder))


def status(superlink, node_id: int) -> str | None:
    return superlink["registrar"].statuses().get(node_id)


def wait_signed_off(superlink, node_id: int, seconds: float) -> None:
    """Offline well before the SuperLink's 60 s heartbeat timeout: the SuperNode signed off."""
    wait_until(
        lambda: status(superlink, node_id) != "online",
        seconds=seconds,
        what=f"node {node_id} signed off",
        pause=0.5,
    )


def flwr_run(superlink, app: Path) -> str:
    """Start the app in `app` with `flwr run`; its run id."""
    env = environment(
        FLWR_HOME=str(superlink["state"] / "flwr"),
        PYTHONPATH=str(superlink["state"] / "probe"),  # `flwr run` checks the ServerApp
    )
    result = cli("flwr", "run", str(app), "confide", "--format", "json", env=env)
    reply = json.loads(result.stdout[result.stdout.index("{") :])
    assert reply.get("success"), reply
    return str(reply["run-id"])


def replies(superlink, run_id: str) -> list[dict]:
    """What the probe ServerApp of run `run_id` received."""
    out = superlink["state"] / "out" / f"run-{run_id}.json"
    wait_until(out.is_file, seconds=120, what=f"run {run_id} writing its replies", pause=0.5)
    return json.loads(out.read_text())


def app_folder(tmp_path: Path, name: str, clientapp: str, files: dict[str, str]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "tests"\n\n[tool.flwr.app.components]\n'
        f'serverapp = "probe_server:app"\nclientapp = "{clientapp}"\n'
    )
    for path, text in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)
    return folder


def test_a_foreign_app_is_refused_and_confides_own_app_runs(superlink, tmp_path):
    folder, node_id = institution(superlink, tmp_path, "hospital-a")
    marker = tmp_path / "MARKER"
    evil = app_folder(
        tmp_path,
        "evil",
        "evil.app:app",
        {
            "evil/__init__.py": "",
            "evil/app.py": EVIL.format(marker=str(marker), institution="hospital-a"),
        },
    )
    own = app_folder(tmp_path, "own", "confide.client.app:app", {})
    started = start(folder)
    try:
        started.wait_for("taking hospital-a's tasks", 90)
        assert status(superlink, node_id) == "online"
        # Both runs at once: the SuperNode serves their messages one after the other.
        runs = [flwr_run(superlink, evil), flwr_run(superlink, own)]
        [refused], [answered] = (replies(superlink, run_id) for run_id in runs)
        assert refused["error"][0] == APP_REFUSED
        reason = refused["error"][1]
        assert reason.startswith("hospital-a refuses run ")
        carried = "the app carries files other than pyproject.toml: evil/__init__.py, evil/app.py"
        assert reason.endswith(carried)
        assert str(tmp_path) not in reason
        assert not marker.exists()  # never imported, never run
        assert "refused run" in started.output  # and said so on the institution's console
        assert answered == {"identity": {"institution": "hospital-a"}}
        # Another local process cannot take the institution's tasks without its secret.
        stranger = acquire_client(f"127.0.0.1:{InstitutionDir(folder).load().port}", b"guess")
        with pytest.raises(httpx.HTTPStatusError) as denied:
            stranger.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
        stranger.close()
        assert denied.value.response.status_code == 401
    finally:
        code = started.finish()
    assert code == 0, started.output
    [entry] = Ledger(folder).entries()
    assert entry.kind == "refused-app" and json.loads(entry.note)["reason"] == reason
    assert Ledger(folder).verify() == []
    assert "runner stopped" in (folder / "logs" / "runner.log").read_text()
    assert "SuperNode ID" in (folder / "logs" / "supernode.log").read_text()
    for path, mode in ((SECRET_FILE, 0o600), ("logs/runner.log", 0o600), ("flwr", 0o700)):
        assert (folder / path).stat().st_mode & 0o777 == mode, path


def test_an_activation_refused_right_after_a_crash_is_retried(superlink, tmp_path):
    folder, node_id = institution(superlink, tmp_path, "hospital-c")
    crashed = Started(
        supernode_command(InstitutionDir(folder), write_secret(folder)),
        environment(FLWR_HOME=str(tmp_path / "flwr")),
    )
    try:
        crashed.wait_for("SuperNode ID", 90)
        assert status(superlink, node_id) == "online"
    finally:
        crashed.finish(signal.SIGKILL)  # no sign-off: the SuperLink holds it online a while
    started = start(folder)
    try:
        started.wait_for("refused to activate this SuperNode", 60)
        started.wait_for("retrying in 10s", 5)
    finally:
        code = started.finish()
    assert code == 0, started.output  # stopped while waiting to retry
    assert "revoked" not in started.output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
# SIGKILL only: SIGHUP is handled like SIGTERM (tests/unit/client/test_client_start.py), and a
# killed `start` is the harder case (no handler runs at all).
@pytest.mark.parametrize("sig", [signal.SIGKILL], ids=["start-killed"])
def test_the_supernode_and_the_runner_do_not_outlive_start(superlink, tmp_path, sig):
    name = f"hospital-{sig.name[3:].lower()}"
    folder, node_id = institution(superlink, tmp_path, name)
    started = start(folder)
    try:
        started.wait_for(f"taking {name}'s tasks", 90)
        assert status(superlink, node_id) == "online"
        spawned = spawned_by(started.process.pid)
        assert len(spawned) == 2, spawned  # the runner and the SuperNode
        os.kill(started.process.pid, sig)  # `start` alone, as a closing terminal signals it
        code = started.process.wait(timeout=60)
        wait_until(
            lambda: not any(alive(pid) for pid in spawned),
            seconds=60,
            what="the runner and the SuperNode gone with `start`",
        )
        wait_signed_off(superlink, node_id, 30)
    finally:
        started.finish()
    assert code == (0 if sig == signal.SIGHUP else -signal.SIGKILL), started.output
    # Nothing holds the port or the activation: the next start takes the tasks at once.
    again = start(folder)
    try:
        again.wait_for(f"taking {name}'s tasks", 60)
        assert status(superlink, node_id) == "online"
    finally:
        again.finish()
    for refusal in ("refused to activate", "refused this runner's SuperExec secret"):
        assert refusal not in again.output, again.output


def test_start_refuses_while_the_port_is_taken(superlink, tmp_path):
    folder, _ = institution(superlink, tmp_path, "hospital-p")
    port = InstitutionDir(folder).load().port
    with socket.socket() as orphan:
        orphan.bind(("127.0.0.1", port))
        orphan.listen()
        result = cli("confide-client", "start", "--dir", str(folder))
    assert result.returncode == 2
    said = " ".join(result.stderr.split())
    assert f"127.0.0.1:{port}" in said
    assert "another SuperNode of this institution may still be running" in said
