"""`confide-server start` as an operator runs it: real SuperLink and enrollment over TLS."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from confide.protos.v1 import enrollment_pb2, enrollment_pb2_grpc

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ENV = os.environ | {"COLUMNS": "200", "NO_COLOR": "1", "FLWR_TELEMETRY_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "confide-server"), *args], capture_output=True, text=True, timeout=120, env=ENV
    )


def read_until(process: subprocess.Popen[str], marker: str, seconds: float) -> str:
    """Collect the process's output until `marker` appears (a reader thread, so lines that
    arrive together in one chunk are not left in a buffer that select() cannot see)."""
    lines: list[str] = []

    def collect() -> None:
        for line in process.stdout:
            lines.append(line)

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(marker in line for line in lines):
            return "".join(lines)
        if process.poll() is not None:
            reader.join(timeout=5)
            break
        time.sleep(0.2)
    raise AssertionError(f"no {marker!r} within {seconds}s; output so far:\n{''.join(lines)}")


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    state = tmp_path_factory.mktemp("coordinator") / "state"
    ports = {"superlink": free_port(), "enrollment": free_port()}
    init = server_cli(
        "init",
        "--dir",
        str(state),
        "--bind",
        "127.0.0.1",
        "--superlink-port",
        str(ports["superlink"]),
        "--enrollment-port",
        str(ports["enrollment"]),
    )
    assert init.returncode == 0, init.stderr
    process = subprocess.Popen(
        [str(BIN / "confide-server"), "start", "--dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    try:
        banner = read_until(process, "ready", 120)
        yield {"state": state, "process": process, "banner": banner, **ports}
    finally:
        # SIGTERM first: the coordinator then stops its SuperLink, which runs in its own
        # session and would outlive a SIGKILL of the coordinator.
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def register(coordinator, token: str) -> enrollment_pb2.RegisterResponse:
    ca = (coordinator["state"] / "ca.pem").read_bytes()
    channel = grpc.secure_channel(
        f"127.0.0.1:{coordinator['enrollment']}", grpc.ssl_channel_credentials(ca)
    )
    key = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    request = enrollment_pb2.RegisterRequest(token=token, public_key_openssh=key)
    return enrollment_pb2_grpc.EnrollmentStub(channel).Register(request, timeout=60)


def supernodes(coordinator) -> dict[str, str]:
    listing = subprocess.run(
        [str(BIN / "flwr"), "supernode", "list", "confide", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV | {"FLWR_HOME": str(coordinator["state"] / "flwr")},
    )
    nodes = json.loads(listing.stdout[listing.stdout.index("{") :])["nodes"]
    return {node["node-id"]: node["status"] for node in nodes}


def test_start_reports_where_both_services_listen(coordinator):
    assert f"127.0.0.1:{coordinator['superlink']}" in coordinator["banner"]
    assert f"127.0.0.1:{coordinator['enrollment']}" in coordinator["banner"]
    leaf = ssl.get_server_certificate(("127.0.0.1", coordinator["enrollment"]))
    assert "BEGIN CERTIFICATE" in leaf


def test_a_token_registers_the_institution_with_the_superlink(coordinator):
    created = server_cli(
        "token", "create", "--dir", str(coordinator["state"]), "--institution", "hospital-a"
    )
    assert created.returncode == 0, created.stderr
    reply = register(coordinator, created.stdout.strip())
    assert reply.institution == "hospital-a" and reply.node_id > 0
    assert str(reply.node_id) in supernodes(coordinator)
    with pytest.raises(grpc.RpcError) as reused:
        register(coordinator, created.stdout.strip())
    assert reused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def client_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "confide-client"), *args], capture_output=True, text=True, timeout=120, env=ENV
    )


def new_token(coordinator, institution: str) -> str:
    created = server_cli(
        "token", "create", "--dir", str(coordinator["state"]), "--institution", institution
    )
    assert created.returncode == 0, created.stderr
    return created.stdout.strip()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "local.csv"
    rows = ["a,b,label"] + [f"{i},{i % 7},{i % 2}" for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    return path


def join(coordinator, data_file: Path, state: Path, name: str, *extra: str) -> str:
    """Join `name` into `state` without starting it; return its node id."""
    joined = client_cli(
        "join",
        "--server",
        f"127.0.0.1:{coordinator['enrollment']}",
        "--token",
        new_token(coordinator, name),
        "--dir",
        str(state),
        "--data",
        str(data_file),
        "--port",
        str(free_port()),
        "--no-start",
        *extra,
    )
    assert joined.returncode == 0, joined.stderr
    return str(tomllib.loads((state / "institution.toml").read_text())["node_id"])


def start_client(state: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "confide-client"), "start", "--dir", str(state)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
        start_new_session=True,
    )


def kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_online(coordinator, node_ids: list[str], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = supernodes(coordinator)
        if all(status.get(i) == "online" for i in node_ids):
            return
        time.sleep(1)


def test_two_institutions_join_and_their_supernodes_come_online(coordinator, data_file, tmp_path):
    running = []
    try:
        ids = []
        for name in ("hospital-b", "hospital-c"):
            state = tmp_path / name
            ids.append(join(coordinator, data_file, state, name))
            assert (state / "institution.key").stat().st_mode & 0o777 == 0o600
            running.append(start_client(state))
        wait_online(coordinator, ids)
        assert all(supernodes(coordinator).get(i) == "online" for i in ids)
    finally:
        for process in running:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def test_join_refusals_leave_nothing_registered(coordinator, data_file, tmp_path):
    server = f"127.0.0.1:{coordinator['enrollment']}"
    token = new_token(coordinator, "hospital-d")
    before = set(supernodes(coordinator))
    # A token whose CA fingerprint is not this coordinator's: refused before registering.
    forged = token[:-64] + "0" * 64
    refused = client_cli(
        "join",
        "--server",
        server,
        "--token",
        forged,
        "--dir",
        str(tmp_path / "d1"),
        "--data",
        str(data_file),
        "--no-start",
    )
    assert refused.returncode == 2 and "CA fingerprint mismatch" in refused.stderr
    # No TLS at the address: refused, never downgraded to plaintext.
    plain = socket.socket()
    plain.bind(("127.0.0.1", 0))
    plain.listen()
    try:
        plaintext = client_cli(
            "join",
            "--server",
            f"127.0.0.1:{plain.getsockname()[1]}",
            "--token",
            token,
            "--dir",
            str(tmp_path / "d2"),
            "--data",
            str(data_file),
            "--no-start",
        )
    finally:
        plain.close()
    assert plaintext.returncode == 2 and "TLS" in plaintext.stderr
    # Unreadable data: refused before anything is registered.
    bad = client_cli(
        "join",
        "--server",
        server,
        "--token",
        token,
        "--dir",
        str(tmp_path / "d3"),
        "--data",
        str(tmp_path / "missing.csv"),
    )
    assert bad.returncode == 2 and "--data" in bad.stderr
    assert set(supernodes(coordinator)) == before
    # The token survived all of that; once used, it is refused.
    ok = client_cli(
        "join",
        "--server",
        server,
        "--token",
        token,
        "--dir",
        str(tmp_path / "d4"),
        "--data",
        str(data_file),
        "--no-start",
    )
    assert ok.returncode == 0, ok.stderr
    again = client_cli(
        "join",
        "--server",
        server,
        "--token",
        token,
        "--dir",
        str(tmp_path / "d5"),
        "--data",
        str(data_file),
        "--no-start",
    )
    assert again.returncode == 2 and "already used" in again.stderr
    assert not (tmp_path / "d5" / "institution.toml").exists()


def test_revoked_institution_is_cut_off_and_cannot_return(coordinator, data_file, tmp_path):
    state = tmp_path / "hospital-e"
    node_id = join(coordinator, data_file, state, "hospital-e")
    supernode = start_client(state)
    try:
        wait_online(coordinator, [node_id])
        listed = server_cli("institutions", "list", "--dir", str(coordinator["state"]))
        assert "hospital-e" in listed.stdout and "online" in listed.stdout
        revoked = server_cli(
            "institutions", "revoke", "hospital-e", "--dir", str(coordinator["state"])
        )
        assert revoked.returncode == 0, revoked.stderr
        # Cut off: the connected SuperNode stops (bounded wait).
        assert supernode.wait(timeout=90) is not None
    finally:
        kill(supernode)
    assert supernodes(coordinator).get(node_id) in (None, "unregistered")
    # The old key cannot come back: the SuperLink refuses to activate it.
    returning = start_client(state)
    try:
        time.sleep(10)
        assert supernodes(coordinator).get(node_id) in (None, "unregistered")
    finally:
        kill(returning)
    again = server_cli("institutions", "revoke", "hospital-e", "--dir", str(coordinator["state"]))
    assert again.returncode == 2 and "already revoked" in again.stderr


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory) -> list[Path]:
    """Two institutions' CSV files cut from the digits examples the coordinator's test set
    excludes; the second holds no 9s, so labels must be encoded with the job's classes."""
    from confide.tasks.config import DataConfig, TaskConfig
    from confide.tasks.splits import federate

    folder = tmp_path_factory.mktemp("digits")
    split = federate(TaskConfig(name="digits"), DataConfig(validation_fraction=0.0), 2, 0)
    paths = []
    for index, local in enumerate(split.institutions):
        keep = local.train.y != 9 if index == 1 else local.train.y >= 0
        lines = [",".join([*(f"p{j}" for j in range(64)), "digit"])]
        lines += [
            ",".join([*(f"{value:.4f}" for value in row), str(label)])
            for row, label in zip(local.train.x[keep], local.train.y[keep], strict=True)
        ]
        paths.append(folder / f"hospital-{index}.csv")
        paths[-1].write_text("\n".join(lines) + "\n")
    return paths


def check_privacy_report(folder: Path, results: dict, run_id: str, tmp_path: Path) -> None:
    """privacy.json's numbers recompute from its parameters, and each institution's own
    ledger and `confide-client budget` agree with what the coordinator reports."""
    from confide.privacy.accounting import epsilon
    from confide.privacy.config import CentralPrivacyConfig
    from confide.privacy.ledger import Ledger
    from confide.server.central_dp import central_epsilon

    report = json.loads((folder / "privacy.json").read_text())
    central = report["institution_level"]
    assert central["institutions_asked_per_round"] == [2, 2]
    config = CentralPrivacyConfig(enabled=True, noise_multiplier=0.02, clipping_norm=2.0)
    assert central["epsilon"] == pytest.approx(central_epsilon(config, [2, 2]))
    assert results["privacy"]["institution_level"]["epsilon"] == central["epsilon"]
    # The deployed statement says exactly what drew the noise (audit finding 3).
    statement = report["statement"]
    assert "the operating system's CSPRNG (os.urandom) for every noise value (2 institutions)" in (
        statement
    )
    assert "NumPy's PCG64 generator (not a cryptographic generator) seeded with 128 bits" in (
        statement
    )
    assert "secret source" not in statement
    assert report["sample_level"]["neighbouring"] == "add-remove"
    for row in report["sample_level"]["institutions"]:
        settings = tomllib.loads((tmp_path / row["id"] / "institution.toml").read_text())
        assert row["declared_examples"] == settings["declared_examples"]
        assert row["noise_generator"] == "os-csprng"
        history = [(row["noise_multiplier"], row["sample_rate"], row["steps"])]
        assert row["epsilon"] == pytest.approx(epsilon(history, 1e-5, "pld"), rel=1e-9)
        # Their first job, stated by their own ledgers with RDP (a looser bound than PLD).
        assert row["dataset_accountant"] == "rdp"
        assert row["dataset_epsilon"] == pytest.approx(epsilon(history, 1e-5, "rdp"))
        assert row["dataset_epsilon"] > row["epsilon"]
        state = tmp_path / row["id"]
        entries = Ledger(state).entries()
        assert [(e.job, e.run, e.round) for e in entries] == [
            ("digits-deployed", run_id, 1),
            ("digits-deployed", run_id, 2),
        ]
        shown = subprocess.run(
            [str(BIN / "confide-client"), "budget", "--dir", str(state), "--json"],
            capture_output=True, text=True, timeout=60, env=ENV,
        )  # fmt: skip
        assert json.loads(shown.stdout)[0]["epsilon"] == pytest.approx(row["dataset_epsilon"])


JOB = """
name = "digits-deployed"
seed = 0
[task]
name = "digits"
[train]
batch_size = 64
lr = 1.0
[privacy]
target_epsilon = 8.0
delta = 1e-5
# The tighter accountant, deployed: it calibrates sigma and reports the job's epsilon; each
# institution states its ledger's cumulative epsilon with its own accountant (RDP here).
accountant = "pld"
# Wiring only: two institutions cannot get a useful institution-level epsilon (this one is in
# the thousands); the test checks that the noise is added and accounted, not its strength.
[central_privacy]
enabled = true
noise_multiplier = 0.02
clipping_norm = 2.0
[federation]
rounds = 2
min_available = 2
min_train = 2
min_evaluate = 2
timeout = 180
"""


def test_two_institutions_train_a_dp_job_and_its_results_are_written(
    coordinator, digits_files, tmp_path
):
    running = []
    try:
        ids = []
        for index, data in enumerate(digits_files):
            state = tmp_path / f"train-{index}"
            ids.append(join(coordinator, data, state, f"train-{index}", "--label-column", "digit"))
            running.append(start_client(state))
        wait_online(coordinator, ids)
        job = tmp_path / "job.toml"
        job.write_text(JOB)
        submitted = subprocess.run(
            [str(BIN / "confide-server"), "submit", str(job), "--dir", str(coordinator["state"])],
            capture_output=True,
            text=True,
            timeout=400,
            env=ENV,
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    finally:
        for process in running:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
    run_id = submitted.stdout.split("as run ")[1].split(";")[0].strip()
    folder = coordinator["state"] / "runs" / f"run-{run_id}"
    results = json.loads((folder / "results.json").read_text())
    assert {path.name for path in folder.iterdir()} >= {
        "job.toml",
        "metrics.png",
        "epsilon.png",
        "privacy.json",
    }
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(r["institutions_trained"] == 2 for r in results["rounds"])
    assert results["rejected_updates"] == []
    assert results["final"]["accuracy"] > results["initial"]["accuracy"] + 0.2
    trained = {row["id"]: row for row in results["institutions"]}
    assert set(trained) == {"train-0", "train-1"}
    for row in trained.values():
        assert row["rounds_trained"] == 2 and row["accountant"] == "pld"
        assert 0 < row["epsilon"] <= 8.0 and row["delta"] == 1e-5
    assert "final accuracy" in submitted.stdout
    check_privacy_report(folder, results, run_id, tmp_path)
    status = server_cli("status", "--dir", str(coordinator["state"]), "--run", run_id)
    assert status.returncode == 0 and "finished" in status.stdout, status.stdout
    logs = server_cli("logs", run_id, "--dir", str(coordinator["state"]))
    assert "round 2: accuracy" in logs.stdout


def test_a_plaintext_client_is_refused_by_both_services(coordinator):
    token = new_token(coordinator, "hospital-plain")
    channel = grpc.insecure_channel(f"127.0.0.1:{coordinator['enrollment']}")
    request = enrollment_pb2.RegisterRequest(token=token, public_key_openssh=b"x")
    with pytest.raises(grpc.RpcError) as refused:
        enrollment_pb2_grpc.EnrollmentStub(channel).Register(request, timeout=20)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # The SuperLink speaks HTTPS only: a plaintext server would answer any HTTP request with
    # a status line (404 included); a TLS server closes or sends a TLS alert.
    with socket.create_connection(("127.0.0.1", coordinator["superlink"]), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(10)
        try:
            reply = raw.recv(200)
        except (TimeoutError, ConnectionResetError):
            reply = b""
    assert not reply.startswith(b"HTTP/")


def test_an_unregistered_key_is_refused_by_the_superlink(coordinator, tmp_path):
    key = ec.generate_private_key(ec.SECP384R1())
    private = tmp_path / "stranger"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    before = supernodes(coordinator)
    stranger = subprocess.Popen(
        [
            str(BIN / "flower-supernode"),
            "--root-certificates",
            str(coordinator["state"] / "ca.pem"),
            "--superlink",
            f"127.0.0.1:{coordinator['superlink']}",
            "--auth-supernode-private-key",
            str(private),
            "--port",
            str(free_port()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},  # it starts SuperExec
        start_new_session=True,
    )
    try:
        output = read_until(stranger, "2004", 60)
    finally:
        if stranger.poll() is None:
            os.killpg(stranger.pid, signal.SIGKILL)
        stranger.wait()
    assert "SuperNode ID" not in output
    assert supernodes(coordinator) == before


def test_sigterm_stops_the_coordinator_and_its_superlink(coordinator):
    process = coordinator["process"]
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", coordinator["superlink"]), timeout=2).close()
