"""Test-wide settings: Flower and Ray stay quiet and offline, no test touches the host's
ledger index (`confide.privacy.ledger_index`) in the real home directory, and no process a
test starts claims the fixed /metrics ports."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

for _name, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_name, _value)

# `confide-server start` and `confide-client start` serve /metrics on fixed ports by default;
# the tests' coordinators and institutions serve none (they run side by side; `join` saves the
# 0 in institution.toml) unless a test gives a port of its own (--metrics-port, or this
# variable: tests/integration/test_coordinator.py's coordinator and institutions).
os.environ["CONFIDE_METRICS_PORT"] = "0"

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


def _unwritable(path: Path, *, replace: bool) -> Callable[[], object]:
    """Make `path` unwritable (see `write_protect`); return the undo."""
    if os.geteuid() != 0 and not replace:
        mode = path.stat().st_mode
        path.chmod(0o444)
        return partial(path.chmod, mode)
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode:
        pytest.skip("cannot make a file immutable here (chattr +i)")
    return partial(subprocess.run, [chattr, "-i", str(path)], check=True)


@pytest.fixture
def write_protect() -> Iterator[Callable[..., Callable[[], object]]]:
    """`protect(path, replace=False)` makes the file `path` really unwritable for this test's
    processes and returns the undo (also run at teardown). Skips where it cannot.

    A normal user: mode 0444 (opening it for writing fails with EACCES). Root, whom modes do
    not stop, and any test that needs a rename over the file to fail too (`replace`: a
    rename depends on the folder, not the file's mode): the immutable attribute (`chattr
    +i`), which makes the kernel refuse writing, renaming over and deleting the file, root
    included (EPERM). It needs CAP_LINUX_IMMUTABLE and a file system that keeps the attribute
    (ext4, xfs, btrfs); the test is skipped elsewhere.
    """
    undo: list[Callable[[], object]] = []

    def protect(path: Path, *, replace: bool = False) -> Callable[[], object]:
        undo.append(_unwritable(path, replace=replace))
        try:
            with open(path, "r+b"):
                pass
        except PermissionError:
            return undo[-1]
        pytest.skip(f"{path} stays writable for this process")

    yield protect
    for release in reversed(undo):
        release()


@pytest.fixture
def refuse_updates() -> Iterator[Callable[[Any, str], Callable[[], None]]]:
    """`refuse(engine, table)` makes a real SQLite database (a SQLAlchemy engine's) refuse
    every update of `table` — a trigger that raises, as a commit that fails — and returns the
    undo (also run at teardown): the step of a multi-step change that writes `table` fails,
    those before it stand."""
    undo: list[Callable[[], None]] = []

    def refuse(engine: Any, table: str) -> Callable[[], None]:
        trigger = f"refuse_{table}"
        with engine.begin() as connection:
            connection.exec_driver_sql(
                f"CREATE TRIGGER {trigger} BEFORE UPDATE ON {table} "
                "BEGIN SELECT RAISE(ABORT, 'the database refused the write'); END"
            )

        def allow() -> None:
            with engine.begin() as connection:
                connection.exec_driver_sql(f"DROP TRIGGER IF EXISTS {trigger}")

        undo.append(allow)
        return allow

    yield refuse
    for allow in reversed(undo):
        allow()


class RecordingRegistrar:
    """Stands in for the SuperLink behind the enrollment service (a real one registers keys
    in tests/integration), with Flower's rules: a key is taken once, unregistered nodes
    included, and unregistering a node not registered fails. `refuse` makes it refuse the
    next registrations; `fail_unregister` the next N unregistrations (as a SuperLink that
    does not answer)."""

    def __init__(self) -> None:
        self.registered: list[tuple[bytes, str]] = []
        self.unregistered: list[int] = []
        self.refuse = False
        self.fail_unregister = 0

    def register(self, public_key_openssh: bytes, institution: str) -> int:
        from confide.server.enrollment import RegistrationError

        if self.refuse or any(key == public_key_openssh for key, _ in self.registered):
            raise RegistrationError("key already registered")
        self.registered.append((public_key_openssh, institution))
        return 1000 + len(self.registered)

    def unregister(self, node_id: int) -> None:
        from confide.server.enrollment import RegistrationError

        if self.fail_unregister:
            self.fail_unregister -= 1
            raise RegistrationError("the SuperLink did not answer within 60s")
        if self.statuses().get(node_id) != "registered":
            raise RegistrationError(f"Node {node_id} already deleted, not found or unauthorized")
        self.unregistered.append(node_id)

    def statuses(self) -> dict[int, str]:
        return {
            1001 + i: "unregistered" if 1001 + i in self.unregistered else "registered"
            for i in range(len(self.registered))
        }


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
    server_handle, port = serve(
        service,
        "127.0.0.1:0",
        server_key=state / "server.key",
        server_certificate=state / "server.pem",
    )
    yield {
        "port": port,
        "ca": ca,
        "engine": engine,
        "registrar": registrar,
        "fingerprint": pki.fingerprint(ca),
    }
    server_handle.stop(0)
    engine.dispose()


@pytest.fixture
def saved_model() -> Callable[..., tuple[Any, Any]]:
    """Writes a digits MLP (initialised from `seed`) and its card into a folder, as a run
    does; returns (card, model). `central`: the card's institution-level epsilon."""
    from confide.server.model_file import (
        CentralProvenance,
        ModelBound,
        ModelCard,
        ModelRun,
        PrivacyProvenance,
        encode_weights,
        fingerprint_test_set,
        save_model,
        weights_info,
    )
    from confide.tasks.config import DataConfig, TaskConfig
    from confide.tasks.registry import get_task
    from confide.tasks.splits import split_test

    def make(folder: Path, *, seed: int = 3, central: float | None = None) -> tuple[Any, Any]:
        task = TaskConfig(name="digits")
        model = get_task("digits").build_model(task, shape=(64,), classes=10, seed=seed)
        state = model.state_dict()
        data = encode_weights(state)
        level = None if central is None else CentralProvenance(epsilon=central, delta=1e-6)
        test = split_test(task, DataConfig(), 0)[1]  # the held-out set of the card's run
        card = ModelCard(
            created="2026-12-02T00:00:00+00:00",
            test_set=fingerprint_test_set(test),
            task=task.model_dump(mode="json", exclude_none=True),
            data={},
            input_shape=[64],
            classes=10,
            labels=[str(k) for k in range(10)],
            weights=weights_info(data, state),
            metrics={"accuracy": 0.5},
            run=ModelRun(
                kind="simulation",
                name="t",
                run="r",
                round=2,
                rounds_planned=2,
                stopped=None,
                seed=0,
            ),
            privacy=PrivacyProvenance(
                dp=True,
                accountant="rdp",
                delta=1e-5,
                epsilon_max=2.0,
                institutions=[],
                institution_level=level,
                statement="test",
            ),
            lineage=[],
            bound=ModelBound(
                sample_epsilon=2.0,
                sample_delta=1e-5,
                institution_level_epsilon=central,
                institution_level_delta=None if central is None else 1e-6,
            ),
        )
        save_model(folder, card, data)
        return card, model

    return make
