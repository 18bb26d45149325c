"""`confide-client start` ends cleanly: a signal at any moment stops everything it started,
its children stop once it is gone, a port already taken is refused; its output suits a file.

The SuperNode and the runner are stood in for by sleeping Python processes; the real ones
run in tests/integration/test_institution_runner.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Started, cli, wait_until
from typer.testing import CliRunner

from confide.client import supernode
from confide.client.cli import app as client_cli
from confide.client.institution import InstitutionDir, InstitutionError
from confide.client.runner import SECRET_FILE
from confide.client.supernode import Child, Supervisor, check_port, handle_stop_signals
from confide.common.terminal import output_console
from confide.privacy.ledger import Ledger

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some process listens on (what an orphaned SuperNode leaves)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def set_port(folder: Path, port: int) -> None:
    directory = InstitutionDir(folder)
    directory.save(directory.load().model_copy(update={"port": port}))


# -- a signal at any moment of the start -----------------------------------------------


@pytest.fixture
def supervisor(institution, monkeypatch) -> Iterator[tuple[Supervisor, list[Child]]]:
    """A Supervisor whose runner and SuperNode sleep; every child it starts, killed after."""
    monkeypatch.setattr(supernode, "runner_command", lambda directory, parent: SLEEPER)
    monkeypatch.setattr(supernode, "supernode_command", lambda directory, secret: SLEEPER)
    monkeypatch.setattr(supernode, "check_port", lambda port: None)
    the_supervisor = Supervisor(InstitutionDir(institution), lambda line: None)
    started: list[Child] = []
    start = Child.start

    def recorded(command, *, env, log, on_line) -> Child:
        child = start(command, env=env, log=log, on_line=on_line)
        started.append(child)
        return child

    monkeypatch.setattr(Child, "start", staticmethod(recorded))
    yield the_supervisor, started
    for child in started:
        if child.process.poll() is None:
            os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()


def run_briefly(the_supervisor: Supervisor) -> int | None:
    """`run()` in a thread; its exit code, or None if it still runs after 20 s (hung)."""
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(the_supervisor.run()), daemon=True)
    thread.start()
    thread.join(timeout=20)
    return codes[0] if codes else None


def test_a_signal_after_the_runner_started_starts_no_supernode(supervisor, monkeypatch):
    the_supervisor, started = supervisor

    def signalled_meanwhile(directory, secret) -> list[str]:
        the_supervisor.terminate(signal.SIGINT, None)  # Ctrl-C as the SuperNode is prepared
        return SLEEPER

    monkeypatch.setattr(supernode, "supernode_command", signalled_meanwhile)
    assert run_briefly(the_supervisor) == 0
    [runner] = started  # no SuperNode was started
    assert runner.process.poll() is not None


@pytest.mark.parametrize("which", [1, 2], ids=["runner", "supernode"])
def test_a_signal_while_a_child_starts_stops_it(supervisor, monkeypatch, which):
    the_supervisor, started = supervisor
    record = Child.start  # the recording stand-in

    def signalled_inside(command, *, env, log, on_line) -> Child:
        child = record(command, env=env, log=log, on_line=on_line)
        if len(started) == which:  # started, not yet listed: the handler cannot see it
            the_supervisor.terminate(signal.SIGTERM, None)
        return child

    monkeypatch.setattr(Child, "start", staticmethod(signalled_inside))
    assert run_briefly(the_supervisor) == 0
    assert len(started) == which
    assert all(child.process.poll() is not None for child in started)


def test_nothing_starts_once_stopping(supervisor):
    the_supervisor, started = supervisor
    the_supervisor.terminate(signal.SIGTERM, None)
    assert run_briefly(the_supervisor) == 0 and started == []


# -- SIGHUP, and children that stop with `start` -----------------------------------------


@pytest.fixture
def restored_signals() -> Iterator[None]:
    kept = {signum: signal.getsignal(signum) for signum in (*supernode.STOP_SIGNALS, signal.SIGHUP)}
    yield
    for signum, handler in kept.items():
        signal.signal(signum, handler)


def stop_handler(signum: int, frame: object) -> None:
    return None


@pytest.mark.usefixtures("restored_signals")
def test_a_closed_terminal_stops_start_like_sigterm():
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    handle_stop_signals(stop_handler)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        assert signal.getsignal(signum) is stop_handler


@pytest.mark.usefixtures("restored_signals")
def test_a_sighup_ignored_by_nohup_stays_ignored():
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    handle_stop_signals(stop_handler)
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is stop_handler


# A process that follows its parent as the SuperNode and the runner do; it writes how many
# SIGINTs it got to the file named by argv[1] (argv[2]: the parent to follow, if not its own).
FOLLOWER = """
import os, signal, sys, time
from pathlib import Path
from confide.client.flower_supernode import follow_parent
got = []
signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
follow_parent(int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid(), pause=0.05)
print("following", flush=True)
deadline = time.monotonic() + 30
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)  # room for a second signal, if one came
Path(sys.argv[1]).write_text(str(len(got)))
"""
# `start`, as far as the follower can tell: it starts one, says its pid, and waits.
PARENT = f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {FOLLOWER!r}, sys.argv[1]])
print(child.pid, flush=True)
time.sleep(60)
"""


def signals_counted(marker: Path, seconds: float = 20) -> str:
    """What the follower wrote once it stopped."""
    wait_until(marker.exists, seconds=seconds, what=f"the follower writing {marker.name}")
    return marker.read_text()


def test_a_child_stops_once_when_start_is_killed_even_before_it_is_reaped(tmp_path):
    marker = tmp_path / "signals"
    parent = Started([sys.executable, "-c", PARENT, str(marker)])
    try:
        parent.wait_for("following", 20)  # the child's, through the parent's output
        parent.process.kill()  # SIGKILL: no handler runs; not reaped yet (a zombie answers)
        assert signals_counted(marker) == "1"  # one SIGINT: Flower's handler signs off
    finally:
        parent.finish(signal.SIGKILL)  # the follower too, if it is still there


def test_a_child_whose_parent_is_already_gone_stops_at_once(tmp_path):
    marker = tmp_path / "signals"
    not_the_parent = str(os.getpid() + 1_000_000)
    subprocess.run([sys.executable, "-c", FOLLOWER, str(marker), not_the_parent], timeout=60)
    assert marker.read_text() == "1"


def test_the_supernode_is_run_following_start(institution):
    from confide.client.supernode import supernode_command

    command = supernode_command(InstitutionDir(institution), institution / SECRET_FILE)
    assert command[1:5] == [
        "-m",
        "confide.client.flower_supernode",
        "--parent-pid",
        str(os.getpid()),
    ]
    assert "--isolation" in command  # the rest is flower-supernode's


def test_the_launcher_refuses_to_run_without_a_parent():
    result = subprocess.run(
        [sys.executable, "-m", "confide.client.flower_supernode", "--isolation", "process"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "usage:" in result.stderr


# -- a port already taken ------------------------------------------------------------------


def test_start_refuses_a_taken_port_with_exit_code_2_and_writes_nothing(institution, taken_port):
    set_port(institution, taken_port)
    result = CliRunner().invoke(client_cli, ["start", "--dir", str(institution)])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert f"127.0.0.1:{taken_port}" in said
    assert "another SuperNode of this institution may still be running" in said
    assert not (institution / SECRET_FILE).exists() and not (institution / "logs").exists()


def test_a_free_port_and_one_left_in_time_wait_pass():
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end waits in TIME_WAIT
        client.close()
    check_port(port)


def test_a_port_taken_before_a_restart_is_refused(supervisor, monkeypatch, taken_port):
    the_supervisor, started = supervisor
    set_port(the_supervisor.directory.root, taken_port)
    monkeypatch.setattr(supernode, "check_port", check_port)
    with pytest.raises(InstitutionError, match=f"127.0.0.1:{taken_port}"):
        the_supervisor.run()
    [runner] = started
    assert runner.process.poll() is not None  # stopped on the way out


# -- output that suits a file -----------------------------------------------------------


def test_output_redirected_is_plain_text_at_full_width(monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # as CI sets it
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    console = output_console()
    console.print("[bold red]refused[/] " + "x" * 200)
    assert sys.stdout.getvalue() == "refused " + "x" * 200 + "\n"


def test_budget_redirected_to_a_file_is_neither_cut_nor_coloured(institution):
    Ledger(institution).record_refusal(run="9", fab_hash="ab" * 32, reason="refused")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "NO_COLOR")}
    env["FORCE_COLOR"] = "1"  # as CI sets it: colour codes, unless the console refuses them
    result = cli("confide-client", "budget", "--dir", str(institution), env=env)
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout
    sentence = (
        "Sample-level (epsilon, delta) differential privacy of each dataset (add/remove one "
        "example), composed over every DP-SGD round in this institution's ledger"
    )
    assert sentence in result.stdout  # on one line, as 80 columns would not hold it
    header = next(line for line in result.stdout.splitlines() if "epsilon spent" in line)
    assert all(column in header for column in ("dataset", "remaining", "rounds", "jobs"))
    budget = cli("confide-client", "budget", "--dir", str(institution), "--json", env=env)
    assert json.loads(budget.stdout)[0]["rounds"] == 0
