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
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611

from confide.client.institution import InstitutionConfig, InstitutionDir
from confide.client.runner import SECRET_FILE, acquire_client, write_secret
from confide.client.supernode import supernode_command
from confide.privacy.ledger import Ledger
from confide.privacy.policy import APP_REFUSED
from confide.server import pki
from confide.server.enrollment import FlowerRegistrar
from confide.server.flower import write_connection

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ENV = os.environ | {"COLUMNS": "200", "NO_COLOR": "1", "FLWR_TELEMETRY_ENABLED": "0"}
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """A raw SuperLink (TLS, SuperNode auth) that can run the probe ServerApp."""
    state = tmp_path_factory.mktemp("coordinator")
    ca_key, ca = pki.create_ca()
    server_key, server = pki.issue_server_certificate(ca_key, ca, ["localhost", "127.0.0.1"])
    pki.write_certificate(state / "ca.pem", ca)
    pki.write_certificate(state / "server.pem", server, ca)
    pki.write_private_key(state / "server.key", server_key)
    (state / "probe").mkdir()
    (state / "probe" / "probe_server.py").write_text(PROBE)
    (state / "out").mkdir()
    port = free_port()
    env = ENV | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(state / "flwr"),
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
        "PYTHONPATH": str(state / "probe"),
        "PROBE_OUT": str(state / "out"),
    }
    command = [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile", str(state / "ca.pem"),
        "--ssl-certfile", str(state / "server.pem"),
        "--ssl-keyfile", str(state / "server.key"),
        "--database", str(state / "superlink.db"),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "no SuperLink"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        write_connection(state / "flwr", f"127.0.0.1:{port}", state / "ca.pem")
        yield {"state": state, "port": port, "registrar": FlowerRegistrar(state / "flwr")}
    finally:
        stop(process)


def institution(superlink, tmp_path: Path, name: str) -> tuple[Path, int]:
    """An institution's folder as `join` leaves it (its key registered); its node id."""
    folder = tmp_path / name
    folder.mkdir()
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
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


class Started:
    """`confide-client start --dir FOLDER`, its output collected by a thread."""

    def __init__(self, folder: Path) -> None:
        self.process = subprocess.Popen(
            [str(BIN / "confide-client"), "start", "--dir", str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=ENV,
            start_new_session=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, marker: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while marker not in self.output:
            assert time.monotonic() < deadline, f"no {marker!r}; output:\n{self.output}"
            assert self.process.poll() is None, f"exited; output:\n{self.output}"
            time.sleep(0.2)


def wait_online(superlink, node_id: int, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while superlink["registrar"].statuses().get(node_id) != "online":
        assert time.monotonic() < deadline, f"node {node_id} not online"
        time.sleep(0.5)


def wait_signed_off(superlink, node_id: int, seconds: float) -> None:
    """Offline well before the SuperLink's 60 s heartbeat timeout: the SuperNode signed off."""
    deadline = time.monotonic() + seconds
    while superlink["registrar"].statuses().get(node_id) == "online":
        assert time.monotonic() < deadline, f"node {node_id} still online"
        time.sleep(0.5)


def spawned_by(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie nobody reaped yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def flwr_run(superlink, app: Path) -> str:
    """Start the app in `app` with `flwr run`; its run id."""
    env = ENV | {
        "FLWR_HOME": str(superlink["state"] / "flwr"),
        "PYTHONPATH": str(superlink["state"] / "probe"),  # `flwr run` checks the ServerApp
    }
    result = subprocess.run(
        [str(BIN / "flwr"), "run", str(app), "confide", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    reply = json.loads(result.stdout[result.stdout.index("{") :])
    assert reply.get("success"), reply
    return str(reply["run-id"])


def replies(superlink, run_id: str) -> list[dict]:
    """What the probe ServerApp of run `run_id` received."""
    out = superlink["state"] / "out" / f"run-{run_id}.json"
    deadline = time.monotonic() + 120
    while not out.is_file():
        assert time.monotonic() < deadline, f"run {run_id} wrote no replies"
        time.sleep(0.5)
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
    started = Started(folder)
    try:
        wait_online(superlink, node_id)
        started.wait_for("taking hospital-a's tasks", 60)
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
        stop(started.process)
    assert started.process.returncode == 0
    [entry] = Ledger(folder).entries()
    assert entry.kind == "refused-app" and json.loads(entry.note)["reason"] == reason
    assert Ledger(folder).verify() == []
    assert "runner stopped" in (folder / "logs" / "runner.log").read_text()
    assert "SuperNode ID" in (folder / "logs" / "supernode.log").read_text()
    for path, mode in ((SECRET_FILE, 0o600), ("logs/runner.log", 0o600), ("flwr", 0o700)):
        assert (folder / path).stat().st_mode & 0o777 == mode, path


def test_a_revoked_institution_is_told_so_and_start_fails(superlink, tmp_path):
    folder, node_id = institution(superlink, tmp_path, "hospital-r")
    started = Started(folder)
    try:
        wait_online(superlink, node_id)
        superlink["registrar"].unregister(node_id)
        code = started.process.wait(timeout=60)
    finally:
        stop(started.process)
    time.sleep(0.5)  # the reader thread's last lines
    assert code != 0
    assert "this institution's key was revoked by the coordinator; ask for a new join token" in (
        started.output
    )


def test_an_activation_refused_right_after_a_crash_is_retried(superlink, tmp_path):
    folder, node_id = institution(superlink, tmp_path, "hospital-c")
    crashed = subprocess.Popen(
        supernode_command(InstitutionDir(folder), write_secret(folder)),
        env=ENV | {"FLWR_HOME": str(tmp_path / "flwr")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_online(superlink, node_id)
    finally:
        stop(crashed, signal.SIGKILL)  # no sign-off: the SuperLink holds it online a while
    started = Started(folder)
    try:
        started.wait_for("refused to activate this SuperNode", 60)
        started.wait_for("retrying in 10s", 5)
    finally:
        stop(started.process)
    assert started.process.returncode == 0  # stopped while waiting to retry
    assert "revoked" not in started.output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
# SIGKILL only: SIGHUP is handled like SIGTERM (tests/unit/client/test_client_start.py), and a
# killed `start` is the harder case (no handler runs at all).
@pytest.mark.parametrize("sig", [signal.SIGKILL], ids=["start-killed"])
def test_the_supernode_and_the_runner_do_not_outlive_start(superlink, tmp_path, sig):
    name = f"hospital-{sig.name[3:].lower()}"
    folder, node_id = institution(superlink, tmp_path, name)
    started = Started(folder)
    try:
        wait_online(superlink, node_id)
        started.wait_for(f"taking {name}'s tasks", 60)
        spawned = spawned_by(started.process.pid)
        assert len(spawned) == 2, spawned  # the runner and the SuperNode
        os.kill(started.process.pid, sig)  # `start` alone, as a closing terminal signals it
        code = started.process.wait(timeout=60)
        deadline = time.monotonic() + 60
        while any(alive(pid) for pid in spawned):
            assert time.monotonic() < deadline, "a child of start outlived it"
            time.sleep(0.2)
        wait_signed_off(superlink, node_id, 30)
    finally:
        stop(started.process)
    assert code == (0 if sig == signal.SIGHUP else -signal.SIGKILL), started.output
    # Nothing holds the port or the activation: the next start takes the tasks at once.
    again = Started(folder)
    try:
        wait_online(superlink, node_id)
        again.wait_for(f"taking {name}'s tasks", 60)
    finally:
        stop(again.process)
    for refusal in ("refused to activate", "refused this runner's SuperExec secret"):
        assert refusal not in again.output, again.output


def test_start_refuses_while_the_port_is_taken(superlink, tmp_path):
    folder, _ = institution(superlink, tmp_path, "hospital-p")
    port = InstitutionDir(folder).load().port
    with socket.socket() as orphan:
        orphan.bind(("127.0.0.1", port))
        orphan.listen()
        result = subprocess.run(
            [str(BIN / "confide-client"), "start", "--dir", str(folder)],
            capture_output=True,
            text=True,
            timeout=120,
            env=ENV,
        )
    assert result.returncode == 2
    said = " ".join(result.stderr.split())
    assert f"127.0.0.1:{port}" in said
    assert "another SuperNode of this institution may still be running" in said
