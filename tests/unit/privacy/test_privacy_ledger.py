"""The institution's ledger: cumulative spend, integrity chain, crash safety."""

from __future__ import annotations

import json
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from confide.privacy.accounting import epsilon
from confide.privacy.ledger import (
    KEY,
    LEDGER,
    MARK,
    Ledger,
    LedgerError,
    LedgerTampered,
    Spend,
    fingerprint_bytes,
    fingerprint_file,
)


def spend(round_: int = 1, run: str = "1", dataset: str = "default", sigma: float = 1.1) -> Spend:
    return Spend(
        dataset=dataset,
        fingerprint="sha256:abc",
        job="job",
        run=run,
        round=round_,
        examples=300,
        sample_rate=0.2,
        noise_multiplier=sigma,
        steps=5,
        delta=1e-5,
        accountant="rdp",
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    ledger = Ledger(tmp_path / "institution").open()
    for round_ in (1, 2, 3, 4):
        ledger.record(spend(round_))
    return ledger


def sql(ledger: Ledger, statement: str) -> None:
    connection = sqlite3.connect(ledger.path)
    connection.execute(statement)
    connection.commit()
    connection.close()


def test_new_ledger_is_empty_and_private(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "i").open()
    assert ledger.entries() == [] and ledger.verify() == []
    for name in (LEDGER, KEY, MARK):
        assert stat.S_IMODE((tmp_path / "i" / name).stat().st_mode) == 0o600


def test_spend_is_cumulative_over_runs_at_the_stated_delta(ledger: Ledger) -> None:
    ledger.record(spend(1, run="2"))
    (total,) = ledger.spent(1e-6)
    assert total.rounds == 5 and total.jobs == 2 and total.delta == 1e-6
    assert total.epsilon == pytest.approx(epsilon([(1.1, 0.2, 25)], 1e-6))
    assert ledger.history("default", run="2") == [(1.1, 0.2, 5)]
    assert ledger.history("other") == []


def test_datasets_are_accounted_separately(ledger: Ledger) -> None:
    ledger.record(spend(1, dataset="imaging"))
    spent = {row.dataset: row.rounds for row in ledger.spent(1e-5)}
    assert spent == {"default": 4, "imaging": 1}


def test_training_without_dp_spends_an_unbounded_budget(ledger: Ledger) -> None:
    ledger.record(spend(5, sigma=0.0))
    assert ledger.spent(1e-5)[0].epsilon == float("inf")


@pytest.mark.parametrize(
    ("tampering", "problem"),
    [
        ("UPDATE entries SET noise_multiplier = 5.0 WHERE seq = 2", "entry 2 was altered"),
        ("UPDATE entries SET steps = 1 WHERE seq = 4", "entry 4 was altered"),
        ("DELETE FROM entries WHERE seq = 2", "entry 2 is missing"),
        ("DELETE FROM entries WHERE seq = 4", "the head records 4 entries and 3"),
        ("UPDATE entries SET seq = -seq WHERE seq IN (2, 3)", "out of order"),
        ("UPDATE head SET count = 3", "head record was altered"),
        ("DROP TABLE head", "no such table: head"),
        ("UPDATE entries SET note = CAST(X'FF' AS TEXT) WHERE seq = 2", "not a readable ledger"),
        ("UPDATE entries SET mac = X'00' WHERE seq = 3", "entry 3 was altered"),
        ("UPDATE head SET mac = X'00'", "head record was altered"),
    ],
    ids=[
        "edit-sigma",
        "edit-last",
        "delete-middle",
        "delete-newest",
        "reorder",
        "head",
        "schema",
        "not-utf8",
        "mac-blob",
        "head-mac-blob",
    ],
)
def test_tampering_is_detected_and_stops_every_use(
    ledger: Ledger, tampering: str, problem: str
) -> None:
    sql(ledger, tampering)
    assert any(problem in found for found in ledger.verify()), ledger.verify()
    with pytest.raises(LedgerTampered, match="confide-client budget verify"):
        ledger.history("default")
    with pytest.raises(LedgerTampered):
        ledger.record(spend(5))


def test_swapping_two_entries_contents_is_detected(ledger: Ledger) -> None:
    connection = sqlite3.connect(ledger.path)
    rows = {seq: row for seq, *row in connection.execute("SELECT * FROM entries")}
    columns = [c[1] for c in connection.execute("PRAGMA table_info(entries)")][1:]
    assignments = ", ".join(f"{c} = ?" for c in columns)
    connection.execute(f"UPDATE entries SET {assignments} WHERE seq = 2", rows[3])
    connection.execute(f"UPDATE entries SET {assignments} WHERE seq = 3", rows[2])
    connection.commit()
    connection.close()
    assert ledger.verify()


def test_a_deleted_ledger_or_key_is_detected(ledger: Ledger) -> None:
    ledger.key_path.unlink()
    assert any("key" in p for p in ledger.verify())
    with pytest.raises(LedgerTampered):
        ledger.entries()


def test_a_ledger_deleted_beside_its_key_is_not_silently_recreated(ledger: Ledger) -> None:
    ledger.path.unlink()
    with pytest.raises(LedgerTampered, match=r"missing but its ledger\.key"):
        ledger.open()


def test_an_older_copy_restored_over_the_ledger_is_detected(ledger: Ledger) -> None:
    old = ledger.path.read_bytes()
    ledger.record(spend(5))
    ledger.path.write_bytes(old)
    assert any("an older copy restored" in p for p in ledger.verify()), ledger.verify()


def test_garbage_in_the_ledger_file_is_refused_with_its_path(ledger: Ledger) -> None:
    ledger.path.write_bytes(b"not a database" * 100)
    with pytest.raises(LedgerTampered, match=str(ledger.path)):
        ledger.entries()


def test_reseal_keeps_the_rows_records_why_and_returns_to_service(ledger: Ledger) -> None:
    sql(ledger, "DELETE FROM entries WHERE seq = 2")
    with pytest.raises(LedgerError, match="reason"):
        ledger.reseal(" ")
    problems = ledger.reseal("restored from backup 2026-11-20, entry 2 lost")
    assert problems and ledger.verify() == []
    entries = ledger.entries()
    assert [e.kind for e in entries] == ["spend"] * 3 + ["reseal"]
    assert "entry 2 lost" in entries[-1].note and "missing" in entries[-1].note
    ledger.record(spend(5))
    assert ledger.spent(1e-5)[0].rounds == 4


def test_reseal_of_a_deleted_ledger_starts_an_empty_one_that_says_so(ledger: Ledger) -> None:
    ledger.path.unlink()
    ledger.reseal("disk replaced")
    (entry,) = ledger.entries()
    assert entry.kind == "reseal" and "missing" in entry.note


def test_fingerprints_are_content_hashes(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,label\n1,0\n")
    first = fingerprint_file(path)
    path.write_text("a,label\n1,1\n")
    assert fingerprint_file(path) != first and first.startswith("sha256:")
    assert fingerprint_bytes(b"ab", b"c") != fingerprint_bytes(b"a", b"bc")


WRITER = textwrap.dedent(
    """
    import sys
    from confide.privacy.ledger import Ledger, Spend
    ledger = Ledger(sys.argv[1]).open()
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        ledger.record(Spend("default", "sha256:x", "job", "1", n, 100, 0.1, 1.0, 10, 1e-5, "rdp"))
    """
)


def test_sigkill_mid_write_leaves_a_consistent_ledger(tmp_path: Path) -> None:
    root = tmp_path / "institution"
    counts = []
    for delay in (0.05, 0.13, 0.21, 0.34):
        process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True
        )
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        ledger = Ledger(root)
        assert ledger.verify() == []
        counts.append(len(ledger.entries()))
    # Every kill landed while entries were being written, and each left a usable ledger.
    assert counts == sorted(counts) and counts[-1] > counts[0] > 0


@pytest.mark.parametrize("damage", ["delete", "edit"])
def test_a_missing_or_altered_head_mark_is_detected(ledger: Ledger, damage: str) -> None:
    if damage == "delete":
        ledger.mark_path.unlink()
    else:
        ledger.mark_path.write_text(
            ledger.mark_path.read_text().replace('"count": 4', '"count": 3')
        )
    assert any("ledger.head" in p for p in ledger.verify()), ledger.verify()


def test_a_creation_cut_short_before_the_key_was_in_place_recovers(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "i").open()
    ledger.key_path.rename(ledger.root / f".{KEY}.new")  # as if killed before the last rename
    assert ledger.verify() == [] and ledger.open().entries() == []
    ledger.record(spend(1))
    assert len(ledger.entries()) == 1


def test_deleting_the_ledger_and_its_key_is_detected_by_the_mark_left_behind(ledger: Ledger):
    ledger.path.unlink()
    ledger.key_path.unlink()
    with pytest.raises(LedgerTampered, match=r"missing but its ledger\.head"):
        ledger.open()


def test_a_key_planted_beside_a_ledger_with_entries_is_not_adopted(ledger: Ledger) -> None:
    ledger.key_path.rename(ledger.root / f".{KEY}.new")
    assert any("key" in problem for problem in ledger.verify())
    assert not ledger.key_path.exists()


def test_values_are_signed_as_stored_and_odd_paths_work(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "a #b ?c %d").open()
    ledger.record(Spend("default", "sha256:x", "job", "1", 1, 300, 1, 2, 5, 1e-5, "rdp"))  # ints
    assert ledger.verify() == [] and ledger.history("default") == [(2.0, 1.0, 5)]


FULL_DISK_WRITER = textwrap.dedent(
    """
    import json, resource, signal, sys
    from confide.privacy.ledger import Ledger, LedgerTampered, Spend
    ledger, operation, room = Ledger(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write(), not a killed process
    limit = ledger.path.stat().st_size + room
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    written = 0
    try:
        while True:
            if operation == "record":
                spend = Spend("default", "sha256:x", "job", "1", 100 + written, 100, 0.1, 1.0,
                              10, 1e-5, "rdp")
                ledger.record(spend)
            else:
                ledger.reseal("checked by hand")
            written += 1
    except Exception as error:
        cause = error.__cause__
        print(json.dumps({
            "written": written,
            "type": type(error).__name__,
            "tampered": isinstance(error, LedgerTampered),
            "message": str(error),
            "cause": getattr(cause, "sqlite_errorname", repr(cause)),
        }))
    """
)


@pytest.mark.parametrize(("operation", "room"), [("record", 2000), ("record", 0), ("reseal", 0)])
def test_a_full_disk_is_reported_as_a_failed_write_and_the_ledger_stays_usable(
    ledger: Ledger, operation: str, room: int
) -> None:
    """The disk fills up under a real writer process: no mock, SQLite's own error path.

    The writer lowers its RLIMIT_FSIZE to `room` bytes past the database's size (SIGXFSZ
    ignored), which needs no privileges: the kernel then fails the write() that would grow a
    file past the limit with EFBIG, after the writes before it succeeded — a disk filling up.
    SQLite answers that write failure as it answers ENOSPC (SQLITE_IOERR_WRITE here,
    SQLITE_FULL for ENOSPC): it rolls the transaction back itself (sqlite.org/lang_transaction
    .html, "Response To Errors Within A Transaction"). Root in this container can mount no small
    filesystem for a real ENOSPC, and SQLite refuses /dev/full as its journal; this is the
    nearest real condition. With `room` 2000 some rounds are recorded before the disk fills.
    """
    before = len(ledger.entries())
    child = subprocess.run(
        [sys.executable, "-c", FULL_DISK_WRITER, str(ledger.root), operation, str(room)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    outcome = json.loads(child.stdout)
    assert outcome["type"] == "LedgerError" and not outcome["tampered"], outcome
    assert "the disk is full or the write failed" in outcome["message"], outcome
    assert "was not recorded" in outcome["message"], outcome
    assert outcome["cause"].startswith(("SQLITE_FULL", "SQLITE_IOERR")), outcome
    assert outcome["written"] > 0 if room else outcome["written"] == 0, outcome
    # Either every entry written in full or none of the failed one; the mark not advanced.
    assert ledger.verify() == []
    entries = ledger.entries()
    assert len(entries) == before + outcome["written"]
    assert json.loads(ledger.mark_path.read_text())["count"] == len(entries)
    # With room on the disk again, the next write succeeds.
    ledger.record(spend(99))
    assert ledger.verify() == [] and len(ledger.entries()) == len(entries) + 1


def test_an_imported_ledger_verifies_and_spends_what_its_source_spent(
    ledger: Ledger, tmp_path: Path
) -> None:
    copy = Ledger(tmp_path / "moved")
    entry = copy.import_from(ledger.root)
    assert entry.kind == "import" and json.loads(entry.note)["entries"] == 4
    assert str(ledger.root.resolve()) in entry.note
    assert copy.verify() == [] and copy.spent(1e-5) == ledger.spent(1e-5)
    assert copy.history("default") == ledger.history("default")
    for name in (LEDGER, KEY, MARK):
        assert stat.S_IMODE((copy.root / name).stat().st_mode) == 0o600
    with pytest.raises(LedgerError, match="already exists"):
        copy.import_from(ledger.root)


def test_a_ledger_that_fails_verification_is_not_imported(ledger: Ledger, tmp_path: Path) -> None:
    sql(ledger, "DELETE FROM entries WHERE seq = 2")
    with pytest.raises(LedgerTampered, match="entry 2 is missing"):
        Ledger(tmp_path / "moved").import_from(ledger.root)
    assert not (tmp_path / "moved" / LEDGER).exists()


def test_operator_entries_go_through_the_chain_and_spend_nothing(ledger: Ledger) -> None:
    before = ledger.spent(1e-5)
    entry = ledger.note("new-budget", '{"reason": "new consent round"}')
    assert entry.kind == "new-budget" and entry.steps == 0 and entry.fingerprint == ""
    assert ledger.verify() == [] and ledger.spent(1e-5) == before
    sql(ledger, "UPDATE entries SET note = '{}' WHERE seq = 5")
    assert any("entry 5 was altered" in problem for problem in ledger.verify())
    with pytest.raises(ValueError, match="spend"):
        ledger.note("spend", "")


def test_recording_writes_nothing_outside_the_ledger_folder(
    tmp_path: Path, ledger_index: Path
) -> None:
    """The host's index is the client's business (`confide.client.continuity`): a spend
    recorded in an institution's folder does not write it."""
    institution = tmp_path / "hospital"
    institution.mkdir()
    (institution / "institution.toml").write_text("")
    Ledger(institution).record(spend(1))
    assert not ledger_index.exists()
    assert {path.name for path in institution.iterdir()} == {"institution.toml", LEDGER, KEY, MARK}


# -- the environment, not tampering ---------------------------------------------------------
@pytest.mark.parametrize("condition", ["read-only file", "journal path is a folder"])
def test_a_ledger_the_system_cannot_write_is_an_error_naming_why_not_tampering(
    ledger: Ledger, write_protect, condition: str
) -> None:
    """Real conditions, no mock: a database file this process cannot write (`write_protect`:
    mode 0444, or as root the immutable attribute) makes SQLite open it read-only and answer
    a write with SQLITE_READONLY, "attempt to write a readonly database" — which used to be
    reported as tampering. A folder where SQLite's rollback journal goes makes every use fail
    with SQLITE_IOERR. Either is a LedgerError saying what, and the ledger is unchanged."""
    if condition == "read-only file":
        write_protect(ledger.path)
        assert ledger.verify() == []  # reading works
        expected = "read-only"
    else:
        (ledger.root / f"{LEDGER}-journal").mkdir()
        expected = "a read from the disk failed"
    with pytest.raises(LedgerError) as refused:
        ledger.record(spend(5))
    assert not isinstance(refused.value, LedgerTampered), refused.value
    assert expected in str(refused.value) and str(ledger.path) in str(refused.value)
    if condition == "read-only file":
        assert "this round was not recorded and the ledger is unchanged" in str(refused.value)
        assert "SQLITE_READONLY" in str(refused.value)
        assert len(ledger.entries()) == 4


def test_a_round_whose_mark_could_not_be_written_stands_and_the_ledger_stays_valid(
    ledger: Ledger, write_protect
) -> None:
    """The commit succeeds and the mark's rename after it fails (ledger.head immutable: the
    rename over it is refused, the database is not). The round is recorded and counts; the
    message says so, and not to record it again."""
    release = write_protect(ledger.mark_path, replace=True)
    with pytest.raises(LedgerError) as failed:
        ledger.record(spend(5))
    message = str(failed.value)
    assert not isinstance(failed.value, LedgerTampered)
    assert "this round was recorded" in message and "do not record it again" in message
    assert str(ledger.mark_path) in message and "stays valid" in message
    assert ledger.verify() == [] and len(ledger.entries()) == 5
    assert json.loads(ledger.mark_path.read_text())["count"] == 4
    release()
    ledger.record(spend(6))
    assert json.loads(ledger.mark_path.read_text())["count"] == 6 and ledger.verify() == []


@pytest.mark.parametrize("key", ["kept", "missing"])
def test_a_reseal_whose_mark_could_not_be_put_in_place_is_reported_and_still_verifies(
    ledger: Ledger, write_protect, key: str
) -> None:
    """The reseal commits; putting its mark in place fails. It used to raise a raw OSError
    and, with a new key (the old one missing), leave that key staged: every entry then read
    as altered. The key goes in place first, and the staged mark fits the ledger."""
    sql(ledger, "DELETE FROM entries WHERE seq = 2")
    if key == "missing":
        ledger.key_path.unlink()
    release = write_protect(ledger.mark_path, replace=True)
    with pytest.raises(LedgerError) as failed:
        ledger.reseal("checked by hand")
    message = str(failed.value)
    assert f"the reseal was recorded, but .{MARK}.new could not replace" in message
    assert "Its key is in place and the ledger verifies" in message
    assert not (ledger.root / f".{KEY}.new").exists()
    assert ledger.verify() == [] and ledger.entries()[-1].kind == "reseal"
    release()
    ledger.record(spend(5))  # the next use puts the mark in place
    assert ledger.verify() == [] and not (ledger.root / f".{MARK}.new").exists()


CRASH = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from confide.privacy.ledger import Ledger

    def kill_before(event, args):  # SIGKILL just before the rename onto the named file
        if event == "os.rename" and Path(os.fsdecode(args[1])).name == sys.argv[2]:
            os.kill(os.getpid(), signal.SIGKILL)

    ledger = Ledger(Path(sys.argv[1]))
    sys.addaudithook(kill_before)
    if sys.argv[3] == "reseal":
        ledger.reseal("checked by hand")
    else:
        ledger.import_from(Path(sys.argv[3]))
    """
)


def crash(root: Path, before: str, operation: str) -> None:
    """Run `operation` on the ledger in `root` in a process killed (SIGKILL, a real crash)
    right before it renames a file onto the name `before` (Python's audit hook on
    os.rename and os.replace)."""
    child = subprocess.run([sys.executable, "-c", CRASH, str(root), before, operation], timeout=120)
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("key", ["kept", "missing"])
def test_a_reseal_killed_after_its_commit(ledger: Ledger, key: str) -> None:
    """Killed before the mark went in place, it verifies (the staged mark fits); killed before
    a new key went in place, it says so, and the reseal run again returns it to service."""
    sql(ledger, "DELETE FROM entries WHERE seq = 2")
    if key == "missing":
        ledger.key_path.unlink()
    crash(ledger.root, KEY if key == "missing" else MARK, "reseal")
    if key == "kept":
        assert ledger.verify() == [] and ledger.entries()[-1].kind == "reseal"
        return
    (problem,) = ledger.verify()
    assert "is missing" in problem and "run the reseal again" in problem
    ledger.reseal("the first reseal was cut short")
    assert ledger.verify() == [] and [e.kind for e in ledger.entries()][-2:] == ["reseal"] * 2


# -- moving and importing ---------------------------------------------------------------------
def test_a_moved_ledger_records_no_spend_even_after_a_reseal(ledger: Ledger) -> None:
    ledger.note("moved", json.dumps({"to": "/srv/hospital-b"}))
    assert ledger.moved_to() == "/srv/hospital-b"
    with pytest.raises(LedgerError, match="this ledger was moved to /srv/hospital-b; train from"):
        ledger.record(spend(5))
    ledger.reseal("checked by hand")
    with pytest.raises(LedgerError, match="moved to /srv/hospital-b"):
        ledger.record(spend(5))
    assert len(ledger.spent(1e-5)) == 1 and ledger.spent(1e-5)[0].rounds == 4


@pytest.mark.parametrize("before", [KEY, MARK, LEDGER])
def test_an_import_killed_part_way_is_refused_for_training_and_done_again(
    ledger: Ledger, tmp_path: Path, before: str
) -> None:
    moved = Ledger(tmp_path / "moved")
    crash(moved.root, before, str(ledger.root))
    assert moved.import_cut_short() and not moved.exists()
    with pytest.raises(LedgerError, match="cut short"):
        moved.open()  # never an empty ledger in its place
    entry = moved.import_from(ledger.root)
    assert entry.kind == "import" and moved.verify() == []
    assert moved.spent(1e-5) == ledger.spent(1e-5)
    assert not moved.import_cut_short() and not (moved.root / f".{LEDGER}.import").exists()


def test_an_import_that_fails_at_its_last_step_leaves_nothing_behind(
    ledger: Ledger, tmp_path: Path
) -> None:
    """The rename that puts the database in place fails (a folder stands in its way): the
    key and mark already written and the staged copy are removed again."""
    moved = Ledger(tmp_path / "moved")
    moved.path.mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        moved.import_from(ledger.root)
    assert sorted(path.name for path in moved.root.iterdir()) == [LEDGER]


def test_an_import_cut_short_from_another_ledger_is_not_cleared(
    ledger: Ledger, tmp_path: Path
) -> None:
    other = Ledger(tmp_path / "other").open()
    moved = Ledger(tmp_path / "moved")
    crash(moved.root, LEDGER, str(ledger.root))
    with pytest.raises(LedgerError, match="an import of another ledger"):
        moved.import_from(other.root)
    assert moved.key_path.read_bytes() == ledger.key_path.read_bytes()


def test_a_read_only_check_changes_nothing(tmp_path: Path) -> None:
    """A creation cut short (its key still staged) reads as an empty ledger, and stays as it
    is: `join` checks other folders' ledgers this way."""
    ledger = Ledger(tmp_path / "i").open()
    ledger.key_path.rename(ledger.root / f".{KEY}.new")
    before = sorted(path.name for path in ledger.root.iterdir())
    assert ledger.verify(read_only=True) == [] and ledger.entries(read_only=True) == []
    assert sorted(path.name for path in ledger.root.iterdir()) == before
    assert Ledger(tmp_path / "none").entries(read_only=True) == []
    assert not (tmp_path / "none").exists()
