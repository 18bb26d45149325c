"""The coordinator registers institution keys with a real SuperLink (TLS, node auth on)."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest
from helpers import bare_superlink, cli, openssh_key

from confide.client.institution import InstitutionDir
from confide.privacy.ledger import Ledger, Spend, fingerprint_file
from confide.server import pki
from confide.server.enrollment import EnrollmentService, FlowerRegistrar, RegistrationError, serve
from confide.server.institutions import enrolled_key
from confide.server.state import open_database
from confide.server.tokens import create_token

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    state = tmp_path_factory.mktemp("coordinator")
    with bare_superlink(state):
        yield FlowerRegistrar(state / "flwr")


def openssh_public_key() -> bytes:
    return openssh_key()[1]


def test_a_new_key_is_registered_and_gets_a_node_id(superlink):
    assert superlink.register(openssh_public_key(), "hospital-a") > 0


def test_the_same_key_cannot_be_registered_twice(superlink):
    key = openssh_public_key()
    superlink.register(key, "hospital-b")
    with pytest.raises(RegistrationError):
        superlink.register(key, "hospital-b")


def confide_client(*args: str) -> subprocess.CompletedProcess[str]:
    return cli("confide-client", *args)


@pytest.fixture
def enrollment(superlink, tmp_path):
    """confide's enrollment service (TLS) in front of the real SuperLink."""
    state = superlink.flwr_home.parent  # the SuperLink fixture's folder: its CA and certificate
    engine = open_database(f"sqlite:///{tmp_path}/confide.db")
    service = EnrollmentService(state / "ca.pem", engine, superlink, "127.0.0.1:9091")
    server, port = serve(
        service,
        "127.0.0.1:0",
        server_key=state / "server.key",
        server_certificate=state / "server.pem",
    )
    yield {"engine": engine, "port": port, "ca": pki.load_certificate(state / "ca.pem")}
    server.stop(0)
    engine.dispose()


def joined(enrollment, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """Institution `name` joined with `confide-client join` (a fresh token, 20 rows of data
    in tmp_path); its folder and data file."""
    token = create_token(
        enrollment["engine"],
        name,
        ttl=datetime.timedelta(hours=1),
        ca_fingerprint=pki.fingerprint(enrollment["ca"]),
    )
    (tmp_path / f"{name}.token").write_text(str(token))
    data = tmp_path / f"{name}.csv"
    data.write_text("a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(20)))
    folder = tmp_path / name
    result = confide_client(
        "join", "--server", f"127.0.0.1:{enrollment['port']}", "--dir", str(folder),
        "--data", str(data), "--token-file", str(tmp_path / f"{name}.token"), "--no-start",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return folder, data


def test_rotate_key_moves_the_institution_to_a_new_node_and_keeps_its_budget(
    superlink, enrollment, tmp_path
):
    folder, data = joined(enrollment, tmp_path, "hospital-r")
    directory = InstitutionDir(folder)
    old_node = directory.load().node_id
    ledger = Ledger(folder)
    for server_round in (1, 2):
        spend = Spend("default", fingerprint_file(data), "job", "1", server_round, 16, 0.5, 1.0, 2,
                      1e-5, "rdp")  # fmt: skip
        ledger.record(spend)
    spent = ledger.spent(1e-5)
    rotated = confide_client("rotate-key", "--dir", str(folder))
    assert rotated.returncode == 0, rotated.stderr
    new_node = directory.load().node_id
    statuses = superlink.statuses()
    assert new_node != old_node and statuses[new_node] == "registered"
    assert statuses.get(old_node, "unregistered") == "unregistered"
    assert ledger.spent(1e-5) == spent and ledger.verify() == []


def test_a_rotation_whose_last_commit_failed_is_finished_on_a_real_superlink(
    superlink, enrollment, tmp_path, refuse_updates
):
    """The coordinator's last commit fails (a trigger in its real SQLite database) after the
    real SuperLink registered the new key and unregistered the old node. rotate-key run
    again finishes: Flower refuses to unregister that node a second time, and the
    coordinator reads from its node list that it is unregistered already."""
    folder, _ = joined(enrollment, tmp_path, "hospital-c")
    old_node = InstitutionDir(folder).load().node_id
    allow = refuse_updates(enrollment["engine"], "institutions")
    cut = confide_client("rotate-key", "--dir", str(folder))
    assert cut.returncode == 2 and "old key no longer connects" in " ".join(cut.stderr.split())
    assert superlink.statuses()[old_node] == "unregistered"
    allow()
    again = confide_client("rotate-key", "--dir", str(folder))
    assert again.returncode == 0, again.stderr
    new_node = InstitutionDir(folder).load().node_id
    assert new_node != old_node and superlink.statuses()[new_node] == "registered"
    assert enrolled_key(enrollment["engine"], "hospital-c")[1] == new_node
