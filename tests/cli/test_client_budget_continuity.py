"""A budget that outlives keys and folders: `confide-client rotate-key` keeps the folder and
its ledger, and `join` into a new folder refuses data another ledger on this host spent on,
unless the operator imports that ledger or starts a new budget with a reason.

Every command runs as the installed CLI against confide's enrollment service over real TLS
(the SuperLink behind it is a recording stand-in; tests/integration has a real one).
"""

from __future__ import annotations

import json
import socket
import stat
import time
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization

from confide.client.institution import InstitutionDir
from confide.privacy.ledger import Ledger, fingerprint_file
from confide.privacy.ledger_index import LedgerIndex
from confide.protos.key_rotation import rotation_message, sign_rotation
from confide.protos.v1 import enrollment_pb2, enrollment_pb2_grpc
from confide.server import pki
from confide.server.institutions import enrolled_key, revoke


def plain(text: str) -> str:
    """Output with rich's line wrapping undone (words joined by single spaces)."""
    return " ".join(text.split())


def public_key(folder: Path) -> bytes:
    return (folder / "institution.pub").read_bytes().strip()


# -- join into a new folder ----------------------------------------------------------------
def test_join_indexes_the_folder_under_its_data(spent_institution, records, ledger_index):
    # The CLI ran as a subprocess: it wrote the index this test's environment names.
    assert LedgerIndex(ledger_index).folders(fingerprint_file(records)) == [
        spent_institution.resolve()
    ]


def test_join_refuses_data_another_ledger_spent_on_before_contacting_the_coordinator(
    spent_institution, join_cli, enrollment_coordinator, tmp_path
):
    (spent,) = Ledger(spent_institution).spent(1e-5)
    refused = join_cli("hospital-b")
    assert refused.returncode == 2, refused.stdout
    message = plain(refused.stderr)
    assert f"{spent_institution}: epsilon {spent.epsilon:.3f} spent at delta 1e-05" in message
    assert f"--ledger-from {spent_institution}" in message and "--new-budget --reason" in message
    assert f"rotate-key --dir {spent_institution}" in message
    # Nothing was registered and the new folder holds no key, settings or ledger.
    assert len(enrollment_coordinator["registrar"].registered) == 1
    assert not (tmp_path / "hospital-b").exists()


def test_ledger_from_continues_the_budget_and_later_joins_see_the_newest_copy(
    spent_institution, join_cli, confide_client, tmp_path
):
    joined = join_cli("hospital-b", "--ledger-from", str(spent_institution))
    assert joined.returncode == 0, joined.stderr
    moved = Ledger(tmp_path / "hospital-b")
    assert moved.spent(1e-5) == Ledger(spent_institution).spent(1e-5)
    assert [entry.kind for entry in moved.entries()] == ["spend"] * 3 + ["import"]
    verified = confide_client("budget", "verify", "--dir", str(moved.root))
    assert verified.returncode == 0, verified.stderr
    listed = plain(verified.stdout)
    assert "imported from another folder's ledger" in listed
    assert str(spent_institution.resolve()) in listed
    # A third folder is refused, and told about the copy that holds every spend.
    third = plain(join_cli("hospital-c").stderr)
    assert f"{moved.root}: epsilon" in third and f"{spent_institution}: epsilon" not in third


def test_new_budget_needs_a_reason_and_records_it(
    spent_institution, join_cli, confide_client, tmp_path
):
    no_reason = join_cli("hospital-b", "--new-budget")
    assert no_reason.returncode == 2 and "--new-budget needs --reason" in plain(no_reason.stderr)
    reason = "new data-use agreement 2026-12, approved by the ethics board"
    joined = join_cli("hospital-b", "--new-budget", "--reason", reason)
    assert joined.returncode == 0, joined.stderr
    ledger = Ledger(tmp_path / "hospital-b")
    (entry,) = ledger.entries()
    note = json.loads(entry.note)
    assert entry.kind == "new-budget" and note["reason"] == reason
    assert note["set_aside"] == [str(spent_institution.resolve())]
    assert ledger.spent(1e-5) == [] and ledger.verify() == []
    verified = confide_client("budget", "verify", "--dir", str(ledger.root))
    assert "new budget started by an operator" in verified.stdout and reason in verified.stdout


def test_a_ledger_that_fails_verification_refuses_and_is_named(
    spent_institution, join_cli, tmp_path
):
    (spent_institution / "ledger.head").unlink()
    refused = join_cli("hospital-b")
    message = plain(refused.stderr)
    assert refused.returncode == 2 and f"{spent_institution}: its ledger fails" in message
    assert not (tmp_path / "hospital-b").exists()


# -- rotate-key ----------------------------------------------------------------------------
def test_rotate_key_replaces_the_key_in_place_and_keeps_the_budget(
    spent_institution, confide_client, enrollment_coordinator
):
    directory = InstitutionDir(spent_institution)
    old_key, old_node = directory.private_key.read_bytes(), directory.load().node_id
    spent = Ledger(spent_institution).spent(1e-5)
    rotated = confide_client("rotate-key", "--dir", str(spent_institution))
    assert rotated.returncode == 0, rotated.stderr
    assert "PRIVATE KEY" not in rotated.stdout + rotated.stderr
    assert directory.private_key.read_bytes() != old_key
    assert stat.S_IMODE(directory.private_key.stat().st_mode) == 0o600
    assert not directory.next_private_key.exists() and not directory.next_public_key.exists()
    new_node = directory.load().node_id
    assert enrolled_key(enrollment_coordinator["engine"], "hospital-a") == (
        public_key(spent_institution),
        new_node,
    )
    assert enrollment_coordinator["registrar"].unregistered == [old_node]
    assert Ledger(spent_institution).spent(1e-5) == spent
    assert Ledger(spent_institution).verify() == []


def test_a_revoked_institution_cannot_rotate_and_keeps_its_files(
    spent_institution, confide_client, enrollment_coordinator
):
    revoke(enrollment_coordinator["engine"], enrollment_coordinator["registrar"], "hospital-a")
    key = (spent_institution / "institution.key").read_bytes()
    refused = confide_client("rotate-key", "--dir", str(spent_institution))
    assert refused.returncode == 2 and "not enrolled here" in plain(refused.stderr)
    assert (spent_institution / "institution.key").read_bytes() == key
    assert not InstitutionDir(spent_institution).next_private_key.exists()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_rotation_whose_reply_was_lost_completes_when_run_again(
    spent_institution, confide_client, enrollment_coordinator
):
    directory = InstitutionDir(spent_institution)
    config = directory.load()
    directory.save(config.model_copy(update={"enrollment": f"127.0.0.1:{closed_port()}"}))
    unreachable = confide_client("rotate-key", "--dir", str(spent_institution))
    assert unreachable.returncode == 2 and "current key stays in use" in plain(unreachable.stderr)
    assert directory.next_private_key.is_file()  # kept: the coordinator might have taken it
    directory.save(config)
    # The coordinator takes the staged key from a request whose reply never arrived.
    staged = directory.next_public_key.read_bytes().strip()
    current = serialization.load_ssh_private_key(directory.private_key.read_bytes(), None)
    timestamp = int(time.time())
    message = rotation_message(
        institution="hospital-a",
        new_public_key=staged,
        ca_fingerprint=enrollment_coordinator["fingerprint"],
        timestamp=timestamp,
    )
    channel = grpc.secure_channel(
        f"127.0.0.1:{enrollment_coordinator['port']}",
        grpc.ssl_channel_credentials(pki.pem(enrollment_coordinator["ca"])),
    )
    lost = enrollment_pb2_grpc.EnrollmentStub(channel).RotateKey(
        enrollment_pb2.RotateKeyRequest(
            institution="hospital-a",
            new_public_key_openssh=staged,
            timestamp=timestamp,
            signature=sign_rotation(current, message),
        ),
        timeout=10,
    )
    channel.close()
    again = confide_client("rotate-key", "--dir", str(spent_institution))
    assert again.returncode == 0, again.stderr
    assert public_key(spent_institution) == staged and directory.load().node_id == lost.node_id
    assert not directory.next_private_key.exists()
