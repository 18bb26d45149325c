"""A budget that outlives keys and folders: `confide-client rotate-key` keeps the folder and
its ledger, and `join` into a new folder refuses data another ledger on this host spent on,
unless the operator imports that ledger or starts a new budget with a reason.

Every command runs as the installed CLI against confide's enrollment service over real TLS
(the SuperLink behind it is a recording stand-in; tests/integration has a real one).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from helpers import free_port

from confide.client.institution import InstitutionDir
from confide.privacy.ledger import Ledger, LedgerError, Spend, fingerprint_file
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
    # The source was marked moved: it records no spend, and is not continued a second time.
    source = Ledger(spent_institution)
    assert source.moved_to() == str(moved.root.resolve())
    with pytest.raises(LedgerError, match=f"this ledger was moved to {moved.root.resolve()}"):
        source.record(Spend("default", "sha256:x", "job", "8", 1, 32, 0.25, 1.1, 4, 1e-5, "rdp"))
    again = join_cli("hospital-c", "--ledger-from", str(spent_institution))
    assert again.returncode == 2 and "was moved to" in plain(again.stderr)


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
    spent_institution, confide_client, enrollment_coordinator, records, ledger_index
):
    directory = InstitutionDir(spent_institution)
    old_key, old_node = directory.private_key.read_bytes(), directory.load().node_id
    spent = Ledger(spent_institution).spent(1e-5)
    ledger_index.unlink()  # rotate-key indexes the folder again
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
    fingerprint = fingerprint_file(records)
    assert LedgerIndex(ledger_index).folders(fingerprint) == [spent_institution.resolve()]


def test_a_revoked_institution_cannot_rotate_and_keeps_its_files(
    spent_institution, confide_client, enrollment_coordinator
):
    revoke(enrollment_coordinator["engine"], enrollment_coordinator["registrar"], "hospital-a")
    key = (spent_institution / "institution.key").read_bytes()
    refused = confide_client("rotate-key", "--dir", str(spent_institution))
    assert refused.returncode == 2 and "not enrolled here" in plain(refused.stderr)
    assert (spent_institution / "institution.key").read_bytes() == key
    assert not InstitutionDir(spent_institution).next_private_key.exists()


def test_a_rotation_whose_reply_was_lost_completes_when_run_again(
    spent_institution, confide_client, enrollment_coordinator
):
    directory = InstitutionDir(spent_institution)
    config = directory.load()
    directory.save(config.model_copy(update={"enrollment": f"127.0.0.1:{free_port()}"}))
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


def test_a_rotation_cut_short_at_the_coordinator_completes_when_run_again(
    spent_institution, confide_client, enrollment_coordinator, refuse_updates
):
    """The coordinator registered the new key and unregistered the old node, and its last
    commit failed: the institution's old key no longer connects. It used to lock the
    institution out (the retry refused, the staged key deleted); now the staged key is kept
    and rotate-key run again finishes, after which the new key authenticates."""
    directory, engine = InstitutionDir(spent_institution), enrollment_coordinator["engine"]
    old_node = directory.load().node_id
    allow = refuse_updates(engine, "institutions")
    cut = confide_client("rotate-key", "--dir", str(spent_institution))
    assert cut.returncode == 2 and "the old key no longer connects" in plain(cut.stderr)
    assert enrollment_coordinator["registrar"].unregistered == [old_node]
    staged = directory.next_public_key.read_bytes().strip()
    assert directory.next_private_key.is_file()
    allow()
    again = confide_client("rotate-key", "--dir", str(spent_institution))
    assert again.returncode == 0, again.stderr
    assert public_key(spent_institution) == staged and not directory.next_private_key.exists()
    node = directory.load().node_id
    assert enrolled_key(engine, "hospital-a") == (staged, node) and node != old_node
    # The institution authenticates with its new key: it signs the next rotation.
    assert confide_client("rotate-key", "--dir", str(spent_institution)).returncode == 0


def test_a_staged_key_an_earlier_attempt_sent_survives_a_refused_retry(
    spent_institution, confide_client, enrollment_coordinator, refuse_updates
):
    directory, engine = InstitutionDir(spent_institution), enrollment_coordinator["engine"]
    allow = refuse_updates(engine, "institutions")
    assert confide_client("rotate-key", "--dir", str(spent_institution)).returncode == 2
    allow()
    staged = directory.next_private_key.read_bytes()
    revoke(engine, enrollment_coordinator["registrar"], "hospital-a")
    refused = confide_client("rotate-key", "--dir", str(spent_institution))
    message = plain(refused.stderr)
    assert refused.returncode == 2 and "not enrolled here" in message
    assert directory.next_private_key.read_bytes() == staged
    assert "was sent by an earlier attempt and is kept" in message


def test_rotate_key_says_what_stands_when_the_settings_cannot_be_saved(
    spent_institution, confide_client, enrollment_coordinator, write_protect
):
    directory = InstitutionDir(spent_institution)
    old_node = directory.load().node_id
    write_protect(directory.settings_file, replace=True)
    rotated = confide_client("rotate-key", "--dir", str(spent_institution))
    message = plain(rotated.stderr)
    key, node = enrolled_key(enrollment_coordinator["engine"], "hospital-a")
    assert rotated.returncode == 2 and node != old_node and public_key(spent_institution) == key
    assert f"holds the new key as node {node} and unregistered node {old_node}" in message
    assert f"institution.toml still names node {old_node}" in message
    assert f"set node_id = {node} in {directory.settings_file}" in message
    assert directory.load().node_id == old_node


KILLED_JOIN = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from confide.client.cli import main

    def kill_before(event, args):  # SIGKILL just before the import's database goes in place
        if event == "os.rename" and Path(os.fsdecode(args[1])).name == "ledger.sqlite":
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(kill_before)
    sys.argv = ["confide-client", *sys.argv[1:]]
    main()
    """
)


def test_a_join_whose_import_was_killed_succeeds_when_run_again(
    spent_institution, join_cli, enrollment_coordinator, records, tmp_path
):
    """`join --ledger-from` killed (SIGKILL, a real crash) just before the imported ledger's
    database was put in place; the same join again used to be refused ("already holds a
    ledger") with the staged copy left behind."""
    from confide.server.tokens import create_token

    coordinator = enrollment_coordinator
    hour = datetime.timedelta(hours=1)
    token = create_token(
        coordinator["engine"], "hospital-b", ttl=hour, ca_fingerprint=coordinator["fingerprint"]
    )
    (tmp_path / "killed.token").write_text(str(token))
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_JOIN, "join", "--server",
         f"127.0.0.1:{enrollment_coordinator['port']}", "--dir", str(tmp_path / "hospital-b"),
         "--data", str(records), "--token-file", str(tmp_path / "killed.token"), "--no-start",
         "--ledger-from", str(spent_institution)],
        capture_output=True, text=True, timeout=120, env=os.environ | {"COLUMNS": "200"},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    moved = Ledger(tmp_path / "hospital-b")
    assert moved.import_cut_short()
    joined = join_cli("hospital-b", "--ledger-from", str(spent_institution))
    assert joined.returncode == 0, joined.stderr
    assert moved.verify() == [] and moved.spent(1e-5) == Ledger(spent_institution).spent(1e-5)
    assert [entry.kind for entry in moved.entries()] == ["spend"] * 3 + ["import"]
    assert list(moved.root.glob(".ledger*")) == []  # nothing staged is left behind
