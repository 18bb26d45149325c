"""The audit log: entries chain under a key, and every kind of tampering is reported."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from confide.server.audit import AuditError, AuditLog, AuditUnavailable
from confide.server.settings import ServerSettings, StateDir


@pytest.fixture
def directory(state_dir: StateDir) -> StateDir:
    return state_dir


@pytest.fixture
def log(directory: StateDir):
    with AuditLog.open(directory) as opened:
        for index in range(5):
            opened.append("token.created", actor="operator:alice", institution=f"h-{index}")
        yield opened


def sql(log: AuditLog, statement: str) -> None:
    with log.engine.begin() as connection:
        connection.execute(text(statement))


def test_entries_chain_in_order_and_verify_clean(directory: StateDir):
    with AuditLog.open(directory) as log:
        assert log.verify() == []  # an empty log, before any key exists
        first = log.append("service.started", actor="coordinator", port=9091, tls=True)
        log.append("token.refused", actor="peer:10.0.0.5", reason="unknown", institution=None)
        entries = log.entries()
        assert [entry.seq for entry in entries] == [1, 2]
        assert entries[0] == first
        assert entries[0].details == {"port": 9091, "tls": True}
        assert entries[1].details == {"reason": "unknown", "institution": None}
        assert entries[0].at.endswith("+00:00")
        assert log.verify() == []
    assert directory.audit_key.stat().st_mode & 0o777 == 0o600
    assert directory.audit_head.stat().st_mode & 0o777 == 0o600
    assert json.loads(directory.audit_head.read_text())["seq"] == 2


def test_details_are_plain_values_only(directory: StateDir):
    with AuditLog.open(directory) as log, pytest.raises(TypeError, match="secret"):
        log.append("token.created", actor="x", secret=b"raw bytes")


def test_an_edited_entry_is_reported(log: AuditLog):
    sql(log, 'UPDATE audit_log SET details = \'{"institution":"evil"}\' WHERE seq = 3')
    problems = log.verify()
    assert len(problems) == 1 and "entry 3" in problems[0]
    sql(log, "UPDATE audit_log SET actor = 'operator:bob' WHERE seq = 4")
    assert any("entry 4" in problem for problem in log.verify())


def test_a_deleted_middle_entry_is_reported(log: AuditLog):
    sql(log, "DELETE FROM audit_log WHERE seq = 2")
    problems = log.verify()
    assert any("entry 2 missing" in problem for problem in problems)
    assert any("entry 3" in problem and "MAC" in problem for problem in problems)


@pytest.mark.parametrize("deleted", [1, 2, 5])
def test_deleting_the_newest_entries_is_reported_and_stays_reported(log: AuditLog, deleted: int):
    sql(log, f"DELETE FROM audit_log WHERE seq > {5 - deleted}")
    first = 5 - deleted + 1
    expected = f"entry {first}" if deleted == 1 else f"entries {first}-5"
    assert any(expected in problem and "newest" in problem for problem in log.verify())
    # The next entry chains on the head mark: the gap does not close behind it.
    assert log.append("service.stopped", actor="coordinator").seq == 6
    assert any(f"{expected} missing" in problem for problem in log.verify())


def test_swapped_entries_are_reported(log: AuditLog):
    sql(log, "UPDATE audit_log SET seq = 100 WHERE seq = 2")
    sql(log, "UPDATE audit_log SET seq = 2 WHERE seq = 3")
    sql(log, "UPDATE audit_log SET seq = 3 WHERE seq = 100")
    problems = log.verify()
    assert any("entry 2" in problem for problem in problems)
    assert any("entry 3" in problem for problem in problems)


def test_swapped_contents_are_reported(log: AuditLog):
    """Two entries' whole contents (time, actor, action, details, MAC) swapped, seq kept."""
    columns = "at, actor, action, details, mac"
    with log.engine.begin() as connection:
        rows = {
            row[0]: row[1:]
            for row in connection.execute(
                text(f"SELECT seq, {columns} FROM audit_log WHERE seq IN (2, 3)")
            )
        }
        for seq, other in ((2, 3), (3, 2)):
            connection.execute(
                text(
                    "UPDATE audit_log SET at = :at, actor = :actor, action = :action, "
                    "details = :details, mac = :mac WHERE seq = :seq"
                ),
                dict(zip(columns.split(", "), rows[other], strict=True), seq=seq),
            )
    problems = log.verify()
    assert any("entry 2" in problem for problem in problems)
    assert any("entry 3" in problem for problem in problems)


def test_a_replaced_key_is_reported(log: AuditLog, directory: StateDir):
    directory.audit_key.write_text("ab" * 32 + "\n")
    problems = log.verify()
    assert len(problems) == 1 and "key was replaced" in problems[0]
    with pytest.raises(AuditError, match="head mark does not match"):
        log.append("service.started", actor="coordinator")


def test_a_missing_key_is_reported_and_nothing_is_appended(log: AuditLog, directory: StateDir):
    directory.audit_key.unlink()
    assert "is missing" in log.verify()[0]
    with pytest.raises(AuditError, match=r"key .* is missing"):
        log.append("service.started", actor="coordinator")
    assert not directory.audit_key.exists()  # no new key hides the old entries


def test_a_missing_or_forged_head_is_reported(log: AuditLog, directory: StateDir):
    original = directory.audit_head.read_text()
    directory.audit_head.unlink()
    assert any("head mark" in problem and "missing" in problem for problem in log.verify())
    with pytest.raises(AuditError, match="head mark"):
        log.append("service.started", actor="coordinator")
    forged = json.loads(original) | {"seq": 3}
    directory.audit_head.write_text(json.dumps(forged))
    assert any("does not match the audit key" in problem for problem in log.verify())


def test_an_append_cut_short_before_its_head_mark_is_carried_forward(
    log: AuditLog, directory: StateDir
):
    before = directory.audit_head.read_text()
    log.append("token.created", actor="operator:alice", institution="h-5")
    directory.audit_head.write_text(before)  # as if the process died after its commit
    assert any("newer than the head mark" in problem for problem in log.verify())
    assert log.append("token.created", actor="operator:alice", institution="h-6").seq == 7
    assert log.verify() == []


def test_an_entry_inserted_after_the_head_is_reported_and_blocks_appends(log: AuditLog):
    sql(
        log,
        "INSERT INTO audit_log (seq, at, actor, action, details, mac) VALUES "
        "(6, '2030-01-01T00:00:00+00:00', 'x', 'run.finished', '{}', '00')",
    )
    problems = log.verify()
    assert any("entry 6" in problem for problem in problems)
    with pytest.raises(AuditError, match="do not chain"):
        log.append("service.started", actor="coordinator")


def _append_many(root: str, writer: int, count: int) -> None:
    with AuditLog.open(StateDir(Path(root))) as log:
        for index in range(count):
            log.append("round.refused", actor=f"writer:{writer}", index=index)


def test_concurrent_writers_in_two_processes_keep_one_chain(directory: StateDir):
    context = multiprocessing.get_context("spawn")
    writers = [
        context.Process(target=_append_many, args=(str(directory.root), writer, 25))
        for writer in range(2)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    with AuditLog.open(directory) as log:
        entries = log.entries()
        assert [entry.seq for entry in entries] == list(range(1, 51))
        assert {entry.actor for entry in entries} == {"writer:0", "writer:1"}
        assert log.verify() == []


# -- failures of the environment: one error type, saying what and where ------------------------
def test_a_lock_file_that_cannot_be_opened_is_an_audit_error(log: AuditLog, directory: StateDir):
    """As a root-owned audit.lock left by `sudo confide-server ...` is for another user."""
    directory.audit_lock.unlink()
    directory.audit_lock.mkdir()  # cannot be opened for writing, whoever runs the test
    for call in (
        lambda: log.append("service.started", actor="coordinator"),
        log.verify,
    ):
        with pytest.raises(AuditUnavailable, match=r"audit\.lock") as refused:
            call()
        assert isinstance(refused.value.__cause__, OSError)
    key = directory.audit_key.read_text()
    with pytest.raises(AuditUnavailable):  # not damage: a reseal is no remedy, and refused
        log.reseal("lock file broken", actor="operator:alice")
    assert directory.audit_key.read_text() == key


def test_a_database_that_refuses_is_an_audit_error(log: AuditLog):
    sql(log, "DROP TABLE audit_log")
    for call in (lambda: log.append("service.started", actor="coordinator"), log.entries):
        with pytest.raises(AuditError, match="the database sqlite") as refused:
            call()
        assert isinstance(refused.value.__cause__, SQLAlchemyError)
        assert "no such table" in str(refused.value)


def test_the_coordinator_refuses_to_start_when_its_audit_log_cannot_be_written(
    log: AuditLog, directory: StateDir
):
    from confide.server.coordinator import CoordinatorError, _record_start

    directory.audit_lock.unlink()
    directory.audit_lock.mkdir()
    with pytest.raises(CoordinatorError, match=r"the audit log: .*audit\.lock"):
        _record_start(log, ServerSettings(), 9092)


# -- reseal: the documented way back for a log that appends refuse ----------------------------
@pytest.mark.parametrize("damage", ["key lost", "head lost", "key replaced", "entry inserted"])
def test_a_reseal_starts_a_new_segment_and_appends_work_again(
    log: AuditLog, directory: StateDir, damage: str
):
    old_key = directory.audit_key.read_text()
    if damage == "key lost":
        directory.audit_key.unlink()
    elif damage == "head lost":
        directory.audit_head.unlink()
    elif damage == "key replaced":
        directory.audit_key.write_text("ab" * 32 + "\n")
    else:
        sql(
            log,
            "INSERT INTO audit_log (seq, at, actor, action, details, mac) VALUES "
            "(6, '2030-01-01T00:00:00+00:00', 'x', 'run.finished', '{}', '00')",
        )
    with pytest.raises(AuditError, match="audit reseal"):  # the refusal names the way out
        log.append("service.started", actor="coordinator")
    with pytest.raises(AuditError, match="needs a reason"):
        log.reseal("  ", actor="operator:alice")
    entry, problems = log.reseal("restored from backup, ticket 42", actor="operator:alice")
    assert problems and entry.action == "audit.resealed" and entry.actor == "operator:alice"
    assert entry.details["reason"] == "restored from backup, ticket 42"
    assert entry.details["problems"] and entry.details["unchecked_entries"] == entry.seq - 1
    assert log.verify() == []
    assert log.append("service.started", actor="coordinator").seq == entry.seq + 1
    assert log.verify() == []
    assert directory.audit_key.read_text() != old_key
    assert directory.audit_key.stat().st_mode & 0o777 == 0o600
    assert [e.seq for e in log.entries()][:5] == [1, 2, 3, 4, 5]  # the old entries stay
    with pytest.raises(AuditError, match="intact"):
        log.reseal("again", actor="operator:alice")


def test_after_a_reseal_the_new_segment_is_checked(log: AuditLog, directory: StateDir):
    directory.audit_key.unlink()
    entry, _ = log.reseal("key lost", actor="operator:alice")
    log.append("token.created", actor="operator:alice", institution="h-9")
    sql(log, f"UPDATE audit_log SET actor = 'operator:bob' WHERE seq = {entry.seq + 1}")
    assert any(f"entry {entry.seq + 1}" in problem for problem in log.verify())
    sql(log, f"DELETE FROM audit_log WHERE seq = {entry.seq}")  # the reseal entry itself
    assert log.verify()  # the segment's start is gone: everything is checked, and fails
    forged = "INSERT INTO audit_log (seq, at, actor, action, details, mac) VALUES "
    sql(log, forged + f"({entry.seq}, 'x', 'x', 'audit.resealed', '{{}}', '00')")
    assert log.verify()  # a reseal entry made without the key starts nothing


# -- the CLI: `token create` and `audit` refuse clearly (exit 2), never with a traceback -------
@pytest.fixture
def state(tmp_path: Path) -> Path:
    from typer.testing import CliRunner

    from confide.server.cli import app

    root = tmp_path / "coordinator"
    created = CliRunner().invoke(app, ["init", "--dir", str(root)])
    assert created.exit_code == 0, created.output
    return root


def cli(*args: str):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from confide.server.cli import app

    return CliRunner().invoke(app, list(args))


def token_rows(state: Path) -> int:
    import sqlite3

    with sqlite3.connect(state / "confide.db") as database:
        return database.execute("SELECT count(*) FROM join_tokens").fetchone()[0]


def test_token_create_refuses_cleanly_when_the_audit_log_cannot_be_written(state: Path):
    (state / "audit.lock").mkdir()
    refused = cli("token", "create", "--dir", str(state), "--institution", "a")
    assert refused.exit_code == 2, refused.output
    message = "".join(refused.output.split())  # rich wraps long paths
    assert "audit.lock:Isadirectory" in message and "thetokenwasnotissued" in message
    assert "confide1." not in refused.output


def test_audit_commands_refuse_cleanly_when_the_database_refuses(state: Path):
    import sqlite3

    assert cli("token", "create", "--dir", str(state), "--institution", "a").exit_code == 0
    with sqlite3.connect(state / "confide.db") as database:  # a table it cannot read
        database.execute("DROP TABLE audit_log")
        database.execute("CREATE TABLE audit_log (other INTEGER)")
    for args in (["audit", "--dir", str(state)], ["audit", "verify", "--dir", str(state)]):
        refused = cli(*args)
        assert refused.exit_code == 2, refused.output
        assert "no such column" in refused.output


def test_audit_reseal_brings_a_log_whose_key_was_lost_back_into_service(state: Path):
    for name in ("a", "b"):
        assert cli("token", "create", "--dir", str(state), "--institution", name).exit_code == 0
    (state / "audit.key").unlink()
    refused = cli("token", "create", "--dir", str(state), "--institution", "c")
    assert refused.exit_code == 2 and "audit reseal" in " ".join(refused.output.split())
    assert cli("audit", "verify", "--dir", str(state)).exit_code == 2
    resealed = cli("audit", "reseal", "--dir", str(state), "--reason", "key lost in migration")
    assert resealed.exit_code == 0, resealed.output
    assert "accepted:" in resealed.output and "resealed: entry 3" in resealed.output
    assert list(state.glob("audit.key.replaced-*")) == []  # there was no key to keep
    assert cli("token", "create", "--dir", str(state), "--institution", "c").exit_code == 0
    verified = cli("audit", "verify", "--dir", str(state))
    assert verified.exit_code == 0, verified.output
    assert "intact: 4 entries" in verified.output and "reseal at entry 3" in verified.output
    again = cli("audit", "reseal", "--dir", str(state), "--reason", "x")
    assert again.exit_code == 2 and "nothing to reseal" in again.output


# -- `token create --out`: the file first, then the token ---------------------------------------
def test_token_create_out_refuses_before_issuing_a_token_it_cannot_deliver(
    state: Path, tmp_path: Path
):
    dangling = tmp_path / "t.token"
    dangling.symlink_to(tmp_path / "nowhere")
    refused = cli(
        "token", "create", "--dir", str(state), "--institution", "a", "--out", str(dangling)
    )
    assert refused.exit_code == 2 and "exists" in refused.output
    assert token_rows(state) == 0
    assert not [e for e in AuditLog.open(StateDir(state)).entries() if e.action == "token.created"]


def test_token_create_out_removes_its_file_when_no_token_is_issued(state: Path, tmp_path: Path):
    out = tmp_path / "t.token"
    args = ["token", "create", "--dir", str(state), "--out", str(out)]
    refused = cli(*args, "--institution", "Not A Name")
    assert refused.exit_code == 2 and not out.exists()
    (state / "audit.lock").mkdir()
    refused = cli(*args, "--institution", "a")
    assert refused.exit_code == 2 and not out.exists()
    (state / "audit.lock").rmdir()
    created = cli(*args, "--institution", "a")
    assert created.exit_code == 0, created.output
    assert out.read_text().startswith("confide1.") and out.stat().st_mode & 0o777 == 0o600
    forced = cli(*args, "--institution", "a", "--force")
    assert forced.exit_code == 0 and out.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".t.token")] == []
