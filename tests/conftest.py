"""Test-wide settings: Flower and Ray stay quiet and offline, and no test touches the host's
ledger index (`confide.privacy.ledger_index`) in the real home directory."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

for _name, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_name, _value)

# Set before any test module is imported: some build their subprocesses' environment at
# import time. The autouse fixture below gives each test a fresh index of its own.
_INDEX_HOME = tempfile.mkdtemp(prefix="confide-test-ledger-index-")
atexit.register(shutil.rmtree, _INDEX_HOME, True)
os.environ["CONFIDE_LEDGER_INDEX"] = str(Path(_INDEX_HOME) / "ledgers.json")


@pytest.fixture(autouse=True)
def ledger_index(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's ledger index (inherited by the CLIs and processes it starts)."""
    path = tmp_path_factory.mktemp("ledger-index") / "ledgers.json"
    monkeypatch.setenv("CONFIDE_LEDGER_INDEX", str(path))
    return path


class RecordingRegistrar:
    """Stands in for the SuperLink behind the enrollment service (a real one registers keys
    in tests/integration); `refuse` makes it refuse the next registrations."""

    def __init__(self) -> None:
        self.registered: list[tuple[bytes, str]] = []
        self.unregistered: list[int] = []
        self.refuse = False

    def register(self, public_key_openssh: bytes, institution: str) -> int:
        from confide.server.enrollment import RegistrationError

        if self.refuse or any(key == public_key_openssh for key, _ in self.registered):
            raise RegistrationError("key already registered")
        self.registered.append((public_key_openssh, institution))
        return 1000 + len(self.registered)

    def unregister(self, node_id: int) -> None:
        self.unregistered.append(node_id)


@pytest.fixture
def enrollment_coordinator(tmp_path: Path):
    """confide's enrollment service over real TLS on 127.0.0.1 (a fresh CA and database)."""
    from confide.server import pki
    from confide.server.enrollment import EnrollmentService, serve
    from confide.server.state import open_database

    state = tmp_path / "coordinator"
    state.mkdir()
    ca_key, ca = pki.create_ca()
    server_key, server = pki.issue_server_certificate(ca_key, ca, ["localhost", "127.0.0.1"])
    pki.write_certificate(state / "ca.pem", ca)
    pki.write_certificate(state / "server.pem", server, ca)
    pki.write_private_key(state / "server.key", server_key)
    engine = open_database(f"sqlite:///{state}/confide.db")
    registrar = RecordingRegistrar()
    service = EnrollmentService(state / "ca.pem", engine, registrar, "127.0.0.1:9091")
    server_handle, port = serve(service, "127.0.0.1:0", state / "server.key", state / "server.pem")
    yield {
        "port": port,
        "ca": ca,
        "engine": engine,
        "registrar": registrar,
        "fingerprint": pki.fingerprint(ca),
    }
    server_handle.stop(0)
    engine.dispose()
