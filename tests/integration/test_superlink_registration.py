"""The coordinator registers institution keys with a real SuperLink (TLS, node auth on)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from confide.server import pki
from confide.server.enrollment import FlowerRegistrar, RegistrationError
from confide.server.flower import write_connection

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"SuperLink exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"SuperLink did not listen on {port} within {seconds}s")


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    state = tmp_path_factory.mktemp("coordinator")
    ca_key, ca = pki.create_ca()
    server_key, server = pki.issue_server_certificate(ca_key, ca, ["localhost", "127.0.0.1"])
    pki.write_certificate(state / "ca.pem", ca)
    pki.write_certificate(state / "server.pem", server, ca)
    pki.write_private_key(state / "server.key", server_key)
    port = free_port()
    env = os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # it spawns flower-superexec
        "FLWR_HOME": str(state / "flwr"),
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    process = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile",
            str(state / "ca.pem"),
            "--ssl-certfile",
            str(state / "server.pem"),
            "--ssl-keyfile",
            str(state / "server.key"),
            "--database",
            str(state / "superlink.db"),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port(port, process)
        write_connection(state / "flwr", f"127.0.0.1:{port}", state / "ca.pem")
        yield FlowerRegistrar(state / "flwr")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def openssh_public_key() -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def test_a_new_key_is_registered_and_gets_a_node_id(superlink):
    assert superlink.register(openssh_public_key(), "hospital-a") > 0


def test_the_same_key_cannot_be_registered_twice(superlink):
    key = openssh_public_key()
    superlink.register(key, "hospital-b")
    with pytest.raises(RegistrationError):
        superlink.register(key, "hospital-b")
