"""The Fleet API front, in this process over real TLS, before a stand-in SuperLink that
records what reaches it: Fleet calls pass with the headers they need, nothing else does."""

from __future__ import annotations

import fcntl
import http.client
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from confide.server import pki
from confide.server.front import (
    FLEET_PATHS,
    MAX_BODY_BYTES,
    MAX_CONCURRENCY,
    NODE_AUTH_HEADERS,
    REFUSAL,
    FleetFront,
    FrontServer,
    bind_socket,
    forwarded_headers,
)

# What every SuperNode sends (the front checks only that they are there; Flower checks them).
SIGNED = {
    "flwr-public-key": "cHVibGlj",
    "flwr-signature": "c2lnbmF0dXJl",
    "flwr-timestamp": "2030-01-01T00:00:00+00:00",
}


class RecordingSuperLink:
    """Answers every request 202 with `reply:` and the body; keeps what it received."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, str, dict[str, str], bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        body = await request.body()
        self.received.append(
            (request.method, request.url.path, request.url.query, dict(request.headers), body)
        )
        response = Response(
            b"reply:" + body,
            status_code=202,
            headers={"x-upstream": "yes", "content-type": "application/protobuf"},
        )
        await response(scope, receive, send)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tls")
    ca_key, ca = pki.create_ca()
    key, certificate = pki.issue_server_certificate(ca_key, ca, ["localhost", "127.0.0.1"])
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    pki.write_certificate(paths["ca"], ca)
    pki.write_certificate(paths["cert"], certificate, ca)
    pki.write_private_key(paths["key"], key)
    return paths


def serve(app, tls: dict[str, Path]) -> tuple[FrontServer, int]:  # type: ignore[no-untyped-def]
    sock = bind_socket("127.0.0.1", 0)
    server = FrontServer(app, sock, certificate=tls["cert"], key=tls["key"])
    server.start()
    return server, sock.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tls: dict[str, Path]) -> Iterator[dict]:
    superlink = RecordingSuperLink()
    upstream, upstream_port = serve(superlink, tls)
    front, port = serve(FleetFront(f"https://127.0.0.1:{upstream_port}", tls["ca"]), tls)
    context = ssl.create_default_context(cafile=str(tls["ca"]))
    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=context, timeout=10) as client:
        yield {
            "superlink": superlink,
            "client": client,
            "port": port,
            "context": context,
            "upstream_port": upstream_port,
        }
    front.stop()
    upstream.stop()


@pytest.fixture(scope="module")
def flower_routes() -> list[tuple[str, str]]:
    """(method, path) of every route Flower 1.41's SuperLink serves (its app, as built)."""
    from fastapi.routing import iter_route_contexts
    from flwr.superlink.main import create_app

    routes = []
    for context in iter_route_contexts(create_app().routes):
        routes += [(method, context.path) for method in sorted(context.methods or [])]
    return routes


def test_the_front_passes_exactly_flowers_fleet_routes(flower_routes):
    fleet = {(method, path) for method, path in flower_routes if path.startswith("/v1/fleet/")}
    assert fleet == {("POST", path) for path in FLEET_PATHS}


def test_a_fleet_call_reaches_the_superlink_with_what_it_needs_and_nothing_else(stack):
    stack["superlink"].received.clear()
    headers = {
        "content-type": "application/protobuf",
        "accept": "application/protobuf",
        "flwr-public-key": "cHVibGlj",
        "flwr-signature": "c2lnbmF0dXJl",
        "flwr-timestamp": "2030-01-01T00:00:00+00:00",
        "flwr-package-version": "1.41.0",
        "flwr-component-name": "SuperNode",
        "authorization": "Bearer stolen",
        "cookie": "session=1",
        "x-forwarded-for": "1.2.3.4",
        "forwarded": "for=1.2.3.4",
    }
    reply = stack["client"].post(
        "/v1/fleet/pull-messages?debug=1", content=b"\x08\x01", headers=headers
    )
    assert reply.status_code == 202 and reply.content == b"reply:\x08\x01"
    assert reply.headers["x-upstream"] == "yes"
    assert reply.headers["content-type"] == "application/protobuf"
    [(method, path, query, received, body)] = stack["superlink"].received
    assert (method, path, query, body) == ("POST", "/v1/fleet/pull-messages", "", b"\x08\x01")
    for name in ("content-type", "accept", "flwr-public-key", "flwr-signature", "flwr-timestamp"):
        assert received[name] == headers[name]
    assert received["flwr-package-version"] == "1.41.0"
    for name in ("authorization", "cookie", "x-forwarded-for", "forwarded"):
        assert name not in received
    assert received["host"].startswith("127.0.0.1:") and str(stack["port"]) not in received["host"]


def test_a_large_body_streams_through(stack):
    stack["superlink"].received.clear()
    payload = bytes(range(256)) * 40_000  # 10 MB
    reply = stack["client"].post("/v1/fleet/push-object", content=payload, headers=SIGNED)
    assert reply.status_code == 202 and reply.content == b"reply:" + payload


def test_the_node_auth_headers_are_flowers():
    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER

    flower = (FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER, TIMESTAMP_HEADER)
    assert tuple(name.lower() for name in flower) == NODE_AUTH_HEADERS


@pytest.mark.parametrize("missing", NODE_AUTH_HEADERS)
@pytest.mark.parametrize("how", ["absent", "empty"])
def test_a_fleet_call_without_node_auth_headers_is_refused_by_the_front(
    stack, missing: str, how: str
):
    stack["superlink"].received.clear()
    headers = {name: value for name, value in SIGNED.items() if name != missing}
    if how == "empty":
        headers[missing] = ""
    reply = stack["client"].post("/v1/fleet/push-object", content=b"x" * 1000, headers=headers)
    assert reply.status_code == 401 and "authentication headers" in reply.text
    assert stack["superlink"].received == []


def test_a_body_over_the_cap_is_refused_declared_or_streamed(stack, tls):
    assert MAX_BODY_BYTES >= 10 * 5 * 1024 * 1024  # Flower's 5 MiB array chunks, and more
    superlink = stack["superlink"]
    superlink.received.clear()
    upstream = f"https://127.0.0.1:{stack['upstream_port']}"
    front, port = serve(FleetFront(upstream, tls["ca"], max_body=1000), tls)
    try:
        with httpx.Client(
            base_url=f"https://127.0.0.1:{port}", verify=stack["context"], timeout=10
        ) as client:
            declared = client.post("/v1/fleet/push-object", content=b"x" * 1001, headers=SIGNED)
            assert declared.status_code == 413 and "at most 1000 bytes" in declared.text
            assert superlink.received == []

            def chunks():  # no Content-Length: counted as it streams
                for _ in range(20):
                    yield b"y" * 100

            streamed = client.post("/v1/fleet/push-object", content=chunks(), headers=SIGNED)
            assert streamed.status_code == 413
            assert superlink.received == []
            fits = client.post("/v1/fleet/push-object", content=b"z" * 1000, headers=SIGNED)
            assert fits.status_code == 202 and len(superlink.received) == 1
    finally:
        front.stop()


def test_the_front_serves_a_bounded_number_of_connections(tls):
    front, _ = serve(FleetFront("https://127.0.0.1:1", tls["ca"]), tls)
    try:
        assert front.server.config.limit_concurrency == MAX_CONCURRENCY
    finally:
        front.stop()


def test_every_other_flower_route_is_refused_and_never_forwarded(stack, flower_routes):
    stack["superlink"].received.clear()
    others = [route for route in flower_routes if not route[1].startswith("/v1/fleet/")]
    assert any(path.startswith("/v1/control/") for _, path in others)
    assert any(path.startswith("/v1/runtime/") for _, path in others)
    for method, path in others:
        reply = stack["client"].request(method, path, content=b"" if method == "HEAD" else b"x")
        assert reply.status_code == 403, (method, path)
        if method != "HEAD":
            assert reply.text == REFUSAL
    assert stack["superlink"].received == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/fleet/pull-messages"),
        ("PUT", "/v1/fleet/push-messages"),
        ("POST", "/v1/fleet/unknown"),
        ("POST", "/v1/fleet/"),
        ("POST", "/v1/fleet/pull-messages/"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
        ("POST", "//v1/fleet/pull-messages"),
        ("DELETE", "/"),
        ("OPTIONS", "*"),
    ],
)
def test_odd_requests_are_refused(stack, method: str, path: str):
    stack["superlink"].received.clear()
    # http.client sends the path as given: no normalising of `..` on the way.
    connection = http.client.HTTPSConnection(
        "127.0.0.1", stack["port"], context=stack["context"], timeout=10
    )
    try:
        connection.request(method, path, body=b"x")
        reply = connection.getresponse()
        assert reply.status == 403 and reply.read().decode() == REFUSAL
    finally:
        connection.close()
    assert stack["superlink"].received == []


def test_a_superlink_that_is_down_is_unavailable_not_an_error(tls):
    closed = bind_socket("127.0.0.1", 0)
    port = closed.getsockname()[1]
    closed.close()
    front, front_port = serve(FleetFront(f"https://127.0.0.1:{port}", tls["ca"]), tls)
    try:
        context = ssl.create_default_context(cafile=str(tls["ca"]))
        reply = httpx.post(
            f"https://127.0.0.1:{front_port}/v1/fleet/get-run",
            headers=SIGNED,
            verify=context,
            timeout=10,
        )
        assert reply.status_code == 503  # SuperNodes retry on 503
    finally:
        front.stop()


def test_forwarded_headers_keep_flower_ones_and_drop_hop_by_hop():
    kept = forwarded_headers(
        [
            ("Flwr-Signature", "s"),
            ("Connection", "keep-alive"),
            ("Transfer-Encoding", "chunked"),
            ("Host", "evil"),
            ("Content-Length", "3"),
        ]
    )
    assert kept == {"flwr-signature": "s", "content-length": "3", "accept-encoding": "identity"}


def test_settings_written_before_the_control_port_still_load(tmp_path: Path):
    from confide.server.settings import ServerSettings, StateDir, StateError

    directory = StateDir(tmp_path)
    directory.settings_file.write_text(
        'hosts = ["localhost"]\nsuperlink_port = 9091\nenrollment_port = 9100\n'
        'bind = "0.0.0.0"\ndatabase = "sqlite:///{state}/confide.db"\n'
    )
    assert directory.load_settings().control_port == 0  # a free port at each start
    directory.save_settings(ServerSettings(superlink_port=9091, control_port=9092))
    assert directory.load_settings().control_port == 9092
    directory.settings_file.write_text("superlink_port = 9091\ncontrol_port = 9091\n")
    with pytest.raises(StateError, match="ports must differ"):
        directory.load_settings()


# -- the coordinator around the front: its ports, the SuperLink's environment, its pid file ----
def taken(port: int) -> bool:
    """Whether another server (SO_REUSEADDR, as servers set it) can bind and listen there."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            other.bind(("127.0.0.1", port))
            other.listen()
        except OSError:
            return True
        return False


def test_the_coordinators_port_check_keeps_the_fronts_port_from_other_servers():
    from confide.server.coordinator import _claim_ports
    from confide.server.settings import ServerSettings

    with socket.socket() as probe, socket.socket() as other:
        probe.bind(("127.0.0.1", 0))
        other.bind(("127.0.0.1", 0))
        port, enrollment = probe.getsockname()[1], other.getsockname()[1]
    settings = ServerSettings(bind="127.0.0.1", superlink_port=port, enrollment_port=enrollment)
    front, _ = _claim_ports(settings)
    try:
        assert taken(port)  # for as long as the SuperLink takes to start
    finally:
        front.close()
    assert not taken(port)


def test_the_superlinks_environment_has_no_flower_switch_for_further_apis(monkeypatch, tmp_path):
    import flwr.common.constant as flower_constants

    from confide.server.coordinator import superlink_command, superlink_environment
    from confide.server.settings import StateDir

    switches = [value for name, value in vars(flower_constants).items() if "INTERNAL" in name]
    assert {"FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API"} <= set(switches)
    for name in [*switches, "FLWR_INTERNAL_SOMETHING_LATER"]:
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("FLWR_LOG_LEVEL", "INFO")  # others pass
    environment = superlink_environment(StateDir(tmp_path))
    assert not [name for name in environment if name.startswith("FLWR_INTERNAL_")]
    assert environment["FLWR_LOG_LEVEL"] == "INFO"
    command = superlink_command(StateDir(tmp_path), 9092)
    addresses = {
        flag: command[command.index(flag) + 1]
        for flag in ("--host", "--control-api-address", "--fleet-api-address")
    }
    assert addresses["--host"] == "127.0.0.1"
    assert addresses["--control-api-address"].startswith("127.0.0.1:")
    assert addresses["--fleet-api-address"].startswith("127.0.0.1:")
    assert "--health-server-address" not in command


@pytest.fixture
def state_dir(tmp_path: Path):  # type: ignore[no-untyped-def]
    from confide.server.settings import StateDir

    return StateDir(tmp_path)


def test_the_pid_file_is_locked_for_the_coordinators_life(state_dir):
    from confide.server.coordinator import CoordinatorError, _pid_file, coordinator_pid

    with _pid_file(state_dir):
        assert state_dir.pid_file.read_text() == f"{os.getpid()}\n"
        assert coordinator_pid(state_dir) == os.getpid()
        running = rf"already running \(pid {os.getpid()}\)"
        with pytest.raises(CoordinatorError, match=running), _pid_file(state_dir):
            pass
        assert state_dir.pid_file.read_text() == f"{os.getpid()}\n"  # not removed
    assert not state_dir.pid_file.exists()
    assert coordinator_pid(state_dir) is None


def test_a_stale_pid_file_is_taken_over_and_an_empty_locked_one_is_left_alone(state_dir):
    from confide.server.coordinator import (
        CoordinatorError,
        _pid_file,
        coordinator_pid,
        stop_coordinator,
    )

    state_dir.pid_file.write_text("999999\n")  # a coordinator that died
    assert coordinator_pid(state_dir) is None
    with _pid_file(state_dir):
        assert coordinator_pid(state_dir) == os.getpid()
    state_dir.pid_file.write_text("")  # a start that holds it and has not written its pid
    with open(state_dir.pid_file) as starting:
        fcntl.flock(starting, fcntl.LOCK_EX)
        with pytest.raises(CoordinatorError, match="already running"), _pid_file(state_dir):
            pass
        with pytest.raises(CoordinatorError, match="not written yet"):
            stop_coordinator(state_dir)
        assert state_dir.pid_file.exists()
    with pytest.raises(CoordinatorError, match="stale pid file was removed"):
        stop_coordinator(state_dir)
    assert not state_dir.pid_file.exists()


def test_a_pid_file_this_user_cannot_read_is_never_deleted(state_dir, monkeypatch):
    """A coordinator run by a service user, `stop` by an admin: cannot tell, so say so."""
    import confide.server.coordinator as coordinator

    state_dir.pid_file.write_text("4242\n")
    real_open = os.open

    def refuse(path, flags, *args):  # type: ignore[no-untyped-def]
        if Path(path) == state_dir.pid_file:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(coordinator.os, "open", refuse)
    with pytest.raises(coordinator.CoordinatorError, match="cannot tell whether a coordinator"):
        coordinator.stop_coordinator(state_dir)
    refused = pytest.raises(coordinator.CoordinatorError, match="another user")
    with refused, coordinator._pid_file(state_dir):
        pass
    assert state_dir.pid_file.read_text() == "4242\n"


def test_a_coordinator_whose_working_folder_is_hidden_cannot_be_told_apart(monkeypatch):
    import confide.server.coordinator as coordinator

    def hidden(path):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(coordinator.os, "readlink", hidden)
    root = Path("/srv/state")
    monkeypatch.setattr(
        Path,
        "read_bytes",
        lambda self: b"python\0/usr/bin/confide-server\0start\0--dir\0state\0",
    )
    assert coordinator.is_coordinator(1, root) is None  # relative --dir: needs the cwd
    monkeypatch.setattr(
        Path,
        "read_bytes",
        lambda self: b"python\0/usr/bin/confide-server\0start\0--dir\0/srv/state\0",
    )
    assert coordinator.is_coordinator(1, root) is True
    monkeypatch.setattr(Path, "read_bytes", lambda self: b"sleep\0100\0")
    assert coordinator.is_coordinator(1, root) is False
