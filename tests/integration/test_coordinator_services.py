"""The coordinator's public face, with real processes on 127.0.0.1: only the Fleet API is
reachable from outside, starting fails safe, `stop` stops exactly one coordinator, failed
joins are rate-limited and everything lands in the audit log."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import tomllib
from pathlib import Path

import grpc
import httpx
import pytest
from helpers import (
    alive,
    cli,
    confide,
    free_port,
    init_coordinator,
    listening,
    openssh_key,
    running_coordinator,
    spawned_by,
    wait_until,
)

from confide.protos.v1 import enrollment_pb2, enrollment_pb2_grpc
from confide.server import pki

pytestmark = pytest.mark.slow


# Set in the operator's environment, these would make Flower's SuperLink open gRPC Control
# and Fleet APIs (on 0.0.0.0 by default) past the front; the coordinator drops them.
FLOWER_SWITCHES = {"FLWR_INTERNAL_GRPC_CONTROL_API": "1", "FLWR_INTERNAL_GRPC_FLEET_API": "1"}


def server_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return cli("confide-server", *args, timeout=timeout)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    state = tmp_path_factory.mktemp("services") / "state"
    with running_coordinator(state, FLOWER_SWITCHES) as running:
        yield running


def public_client(coordinator) -> httpx.Client:
    """A caller that has only what every institution has: the CA certificate."""
    context = ssl.create_default_context(cafile=str(coordinator["state"] / "ca.pem"))
    return httpx.Client(
        base_url=f"https://127.0.0.1:{coordinator['superlink']}", verify=context, timeout=10
    )


def test_every_control_and_runtime_route_is_refused_on_the_public_port(coordinator):
    from fastapi.routing import iter_route_contexts
    from flwr.supercore.routers.runtime import create_runtime_router, responses_router
    from flwr.superlink.routers.control.router import router as control

    routers = [control, create_runtime_router("SuperLink"), responses_router]
    routes = [
        (method, context.path)
        for router in routers
        for context in iter_route_contexts(router.routes)
        for method in context.methods or []
    ]
    assert sum(path.startswith("/v1/control/") for _, path in routes) == len(control.routes)
    assert sum(path.startswith("/v1/runtime/") for _, path in routes) > 10
    with public_client(coordinator) as client:
        for method, path in routes:
            reply = client.request(method, path, content=b"\x08\x01")
            assert reply.status_code == 403, (method, path, reply.text)
            assert reply.text.startswith("refused")
        for method, path in [("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/health")]:
            assert client.request(method, path).status_code == 403
        # The Fleet API is there. Without node-auth headers the front refuses with 401; with
        # made-up ones the call is passed on, and Flower refuses it with 401.
        protobuf = {"content-type": "application/protobuf"}
        unsigned = client.post("/v1/fleet/get-run", headers=protobuf)
        assert unsigned.status_code == 401 and unsigned.text.startswith("refused")
        forged = protobuf | {
            "flwr-public-key": "cHVibGlj",
            "flwr-signature": "c2lnbmF0dXJl",
            "flwr-timestamp": "2030-01-01T00:00:00+00:00",
        }
        passed_on = client.post("/v1/fleet/get-run", headers=forged, content=b"")
        assert passed_on.status_code == 401 and not passed_on.text.startswith("refused")


def test_the_superlink_listens_on_127_0_0_1_only_and_knows_the_state_folder(coordinator):
    state = str(coordinator["state"].resolve())
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"flower-superlink" in part for part in command) and (
            f"{state}/superlink.db".encode() in command
        ):
            environment = (entry / "environ").read_bytes().split(b"\0")
            host = command[command.index(b"--host") + 1]
            break
    else:
        raise AssertionError("no SuperLink process for this state folder")
    assert host == b"127.0.0.1"
    assert f"CONFIDE_STATE_DIR={state}".encode() in environment
    assert not [entry for entry in environment if entry.startswith(b"FLWR_INTERNAL_")]
    for flag in (b"--control-api-address", b"--fleet-api-address"):
        assert command[command.index(flag) + 1].startswith(b"127.0.0.1:")


def test_an_institution_joins_with_a_token_file_and_is_told_the_public_port(coordinator, tmp_path):
    data = tmp_path / "local.csv"
    data.write_text("a,b,label\n" + "".join(f"{i},{i % 7},{i % 2}\n" for i in range(40)))
    token_file = tmp_path / "hospital-a.token"
    created = server_cli(
        "token",
        "create",
        "--dir",
        str(coordinator["state"]),
        "--institution",
        "hospital-a",
        "--out",
        str(token_file),
    )
    assert created.returncode == 0, created.stderr
    institution = tmp_path / "hospital-a"
    joined = cli(
        "confide-client", "join", "--server", f"127.0.0.1:{coordinator['enrollment']}",
        "--token-file", str(token_file), "--dir", str(institution), "--data", str(data),
        "--port", str(free_port()), "--no-start",
    )  # fmt: skip
    assert joined.returncode == 0, joined.stderr
    settings = tomllib.loads((institution / "institution.toml").read_text())
    assert int(settings["node_id"]) > 0
    assert str(coordinator["superlink"]) in json.dumps(settings)  # the public port
    # Its SuperNode connecting through the front: tests/integration/test_coordinator.py
    # (every job there runs through it).
    actions = [entry["action"] for entry in audit_entries(coordinator["state"])]
    for action in ("service.started", "token.created", "token.redeemed", "institution.registered"):
        assert action in actions


def audit_entries(state: Path) -> list[dict]:
    listed = server_cli("audit", "--dir", str(state), "--json")
    assert listed.returncode == 0, listed.stderr
    return [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]


def test_token_create_out_writes_a_private_file_and_never_overwrites(coordinator, tmp_path):
    out = tmp_path / "t.token"
    args = ["token", "create", "--dir", str(coordinator["state"]), "--institution", "x-1"]
    created = server_cli(*args, "--out", str(out))
    assert created.returncode == 0, created.stderr
    assert created.stdout == ""
    assert out.stat().st_mode & 0o777 == 0o600
    token = out.read_text().strip()
    assert token.startswith("confide1.")
    again = server_cli(*args, "--out", str(out))
    assert again.returncode == 2 and "exists" in again.stderr
    assert out.read_text().strip() == token
    forced = server_cli(*args, "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert out.read_text().strip() != token and out.stat().st_mode & 0o777 == 0o600
    created = [e for e in audit_entries(coordinator["state"]) if e["action"] == "token.created"]
    assert token.split(".")[2] not in json.dumps(created)  # the secret never


@pytest.mark.parametrize("taken", ["superlink", "control", "enrollment"])
def test_a_taken_port_is_refused_before_anything_starts(tmp_path, taken: str):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        init_coordinator(tmp_path / "state", **{taken: port})
        refused = server_cli("start", "--dir", str(tmp_path / "state"), timeout=60)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    message = " ".join(refused.stderr.split())
    assert f"port {port}" in message and "not free" in message
    assert "ready" not in refused.stdout
    assert not (tmp_path / "state" / "coordinator.pid").exists()


def test_a_second_coordinator_is_refused_on_the_same_enrollment_port_or_folder(
    coordinator, tmp_path
):
    init_coordinator(tmp_path / "other", enrollment=coordinator["enrollment"])
    refused = server_cli("start", "--dir", str(tmp_path / "other"), timeout=60)
    assert refused.returncode == 2
    assert f"port {coordinator['enrollment']}" in " ".join(refused.stderr.split())
    pid_file = coordinator["state"] / "coordinator.pid"
    pid = pid_file.read_text()
    twice = server_cli("start", "--dir", str(coordinator["state"]), timeout=60)
    assert twice.returncode == 2 and "already running" in " ".join(twice.stderr.split())
    assert coordinator["started"].process.poll() is None
    assert pid_file.read_text() == pid  # the running coordinator's file is left alone


def test_stop_stops_exactly_its_coordinator(coordinator, tmp_path):
    state = tmp_path / "second"
    with running_coordinator(state) as second:
        pid = int((state / "coordinator.pid").read_text())
        assert pid == second["started"].process.pid
        stopped = server_cli("stop", "--dir", str(state))
        assert stopped.returncode == 0, stopped.stderr
        assert second["started"].process.wait(timeout=5) == 0
        assert not (state / "coordinator.pid").exists()
        ports = [second[name] for name in ("superlink", "control", "enrollment")]
        assert not any(listening(port) for port in ports)
        assert coordinator["started"].process.poll() is None
        assert listening(coordinator["superlink"]) and listening(coordinator["control"])
        again = server_cli("stop", "--dir", str(state))
        assert again.returncode == 2 and "no coordinator is running" in again.stderr
        actions = [entry["action"] for entry in audit_entries(state)]
        assert actions[-2:] == ["service.started", "service.stopped"]


def test_a_superlink_that_dies_at_start_is_reported_with_its_log(tmp_path):
    state = tmp_path / "state"
    init_coordinator(state)
    (state / "superlink.db").mkdir()  # the SuperLink cannot open its database
    refused = server_cli("start", "--dir", str(state), timeout=120)
    message = " ".join(refused.stderr.split())
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "the SuperLink exited" in message and "superlink.log" in message
    assert "ready" not in refused.stdout


def register(port: int, ca: bytes, token: str) -> enrollment_pb2.RegisterResponse:
    with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca)) as channel:
        request = enrollment_pb2.RegisterRequest(token=token, public_key_openssh=openssh_key()[1])
        return enrollment_pb2_grpc.EnrollmentStub(channel).Register(request, timeout=60)


def test_failed_joins_are_rate_limited_and_audited_then_sigterm_stops_it_all(tmp_path):
    """A coordinator of its own: the limit then holds for 127.0.0.1 for a while, and SIGTERM
    may stop it. SIGTERM, as a service manager sends it, stops the coordinator (exit status
    0), its SuperLink and everything that SuperLink started, and frees every port."""
    state = tmp_path / "state"
    ports = init_coordinator(state)
    started = confide("confide-server start", "--dir", str(state))
    try:
        started.wait_for("ready", 120)
        ca = (state / "ca.pem").read_bytes()
        fingerprint = pki.fingerprint(pki.load_certificate(state / "ca.pem"))
        guess = f"confide1.{'0' * 16}.{'A' * 43}.{fingerprint}"  # well formed, unknown
        codes = []
        for _ in range(6):
            with pytest.raises(grpc.RpcError) as refused:
                register(ports["enrollment"], ca, guess)
            codes.append(refused.value.code())
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 5 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert re.search(r"try again in \d+ s", refused.value.details())
        children = spawned_by(started.process.pid)  # the SuperLink
        descendants = children + [pid for child in children for pid in spawned_by(child)]
        assert len(descendants) >= 2, descendants  # the SuperLink and its SuperExec
        os.killpg(started.process.pid, signal.SIGTERM)  # as Ctrl-C or a service manager
        assert started.process.wait(timeout=60) == 0, started.output
    finally:
        started.finish()
    wait_until(
        lambda: not any(alive(pid) for pid in descendants),
        seconds=30,
        what="the SuperLink and its SuperExec gone with the coordinator",
    )
    assert not any(listening(port) for port in ports.values())
    refusals = [e for e in audit_entries(state) if e["action"] == "token.refused"]
    assert len(refusals) == 5 and {e["details"]["peer"] for e in refusals} == {"127.0.0.1"}
    assert all(e["details"]["reason"].startswith("unknown join token") for e in refusals)
    verified = server_cli("audit", "verify", "--dir", str(state))
    assert verified.returncode == 0 and "audit log intact" in verified.stdout
