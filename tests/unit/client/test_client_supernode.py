"""The SuperNode's supervisor (`confide.client.supernode.Supervisor`): how it tells from a
SuperNode's exit status and output how it ended, when it starts it again, when it gives up,
and what it says.

The SuperNode and the runner are real short-lived processes: Python scripts that print what
Flower 1.41's SuperNode prints (`SuperNode ID: ...`, `[code: 2004] Failed to activate
SuperNode.`, `SuperNode terminated gracefully.`) and exit with a given status. The real
SuperNode runs in tests/integration/test_institution_runner.py.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port, wait_until

from confide.client import supernode
from confide.client.institution import InstitutionDir
from confide.client.supernode import REVOKED_MESSAGE, Ending, Seen, Supervisor, classify

CONNECTED = "INFO :      SuperNode ID: 7301"
REFUSED = "[code: 2004] Failed to activate SuperNode."
# All it prints when the SuperLink refuses to activate it (exit status 1).
REFUSAL = [
    "ERROR :     Exit Code: 305",
    "Failed to initialize the connection to the SuperLink.",
    REFUSED,
]
GRACEFUL = "INFO :      SuperNode terminated gracefully."
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]

# A SuperNode that behaves as `behaviours[i]` at its i-th start (the last one from then on):
# it counts its starts in the file argv[1], prints the lines, then sleeps and exits.
SCRIPTED = """
import json, sys, time
from pathlib import Path
starts = Path(sys.argv[1])
count = len(starts.read_text().splitlines()) if starts.exists() else 0
with starts.open("a") as marks:
    marks.write("start\\n")
behaviours = json.loads(sys.argv[2])
lines, sleep, code = behaviours[min(count, len(behaviours) - 1)]
for line in lines:
    print(line, flush=True)
time.sleep(sleep)
sys.exit(code)
"""


class Scripted:
    """The scripted SuperNode's command, and how many times it was started."""

    def __init__(self, folder: Path, *behaviours: tuple[list[str], float, int]) -> None:
        import json

        self.starts = folder / "supernode-starts"
        self.command = [sys.executable, "-c", SCRIPTED, str(self.starts), json.dumps(behaviours)]

    @property
    def count(self) -> int:
        return len(self.starts.read_text().splitlines()) if self.starts.exists() else 0


@pytest.fixture
def directory(institution: Path) -> InstitutionDir:
    """The institution, on a port nothing listens on (the supervisor checks it before each
    SuperNode start)."""
    folder = InstitutionDir(institution)
    folder.save(folder.load().model_copy(update={"port": free_port()}))
    return folder


@pytest.fixture
def said() -> list[str]:
    return []


@pytest.fixture
def supervise(directory, said, monkeypatch) -> Iterator:
    """`supervise(supernode, runner=SLEEPER)`: a Supervisor whose SuperNode and runner run
    those commands; its processes are all stopped after the test."""
    supervisors: list[Supervisor] = []

    def make(supernode_command: list[str], runner: list[str] = SLEEPER) -> Supervisor:
        monkeypatch.setattr(supernode, "supernode_command", lambda *_: supernode_command)
        monkeypatch.setattr(supernode, "runner_command", lambda *_: runner)
        supervisors.append(Supervisor(directory, said.append))
        return supervisors[-1]

    yield make
    for supervisor in supervisors:
        for child in supervisor.children:
            if child.process.poll() is None:
                os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()


@pytest.fixture
def short_retries(monkeypatch) -> None:
    """Activation refusals retried after 0.1 s, for at most 1.5 s."""
    monkeypatch.setattr(supernode, "RETRY_PAUSE_SECONDS", 0.1)
    monkeypatch.setattr(supernode, "RETRY_WINDOW_SECONDS", 1.5)


def run_in_thread(supervisor: Supervisor) -> tuple[threading.Thread, list[int]]:
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(supervisor.run()), daemon=True)
    thread.start()
    return thread, codes


def finished(thread: threading.Thread, codes: list[int], seconds: float = 30) -> int:
    thread.join(timeout=seconds)
    assert codes, f"the supervisor still runs after {seconds}s"
    return codes[0]


# -- how a SuperNode ended, from its status and output ---------------------------------------


def seen(*lines: str) -> Seen:
    output = Seen()
    for line in lines:
        output.read(line)
    return output


# The plain cases (revoked, refused, stopped, killed) are in test_client_runner.py; these are
# the ones where one of the three signs is missing or contradicts another.
@pytest.mark.parametrize(
    ("code", "lines", "stopping", "ending"),
    [
        (1, [REFUSED], True, Ending.STOPPED),  # stopped here while being refused
        (1, [CONNECTED, REFUSED], False, Ending.FAILED),  # refused after it had connected
        (0, [REFUSED], False, Ending.FAILED),  # a refusal is never status 0
        (0, [GRACEFUL], False, Ending.FAILED),  # never connected: not a revocation
        (0, [CONNECTED], False, Ending.FAILED),  # ended without saying why
    ],
)
def test_an_ending_with_signs_missing_or_contradicting_is_a_failure(code, lines, stopping, ending):
    assert classify(code, seen(*lines), stopping=stopping) is ending


# -- restarts and giving up, with real processes ----------------------------------------------


def test_a_supernode_revoked_while_connected_fails_start_with_what_to_do(supervise, said, tmp_path):
    supernode_script = Scripted(tmp_path, ([CONNECTED, GRACEFUL], 0, 0))
    assert supervise(supernode_script.command).run() == 1
    assert said == [REVOKED_MESSAGE]
    assert supernode_script.count == 1  # not started again


def test_a_refused_activation_is_retried_until_the_supernode_connects(
    supervise, said, tmp_path, short_retries
):
    supernode_script = Scripted(tmp_path, (REFUSAL, 0, 1), (REFUSAL, 0, 1), ([CONNECTED], 60, 0))
    supervisor = supervise(supernode_script.command)
    thread, codes = run_in_thread(supervisor)
    log = supervisor.logs / "supernode.log"
    wait_until(
        lambda: log.exists() and CONNECTED in log.read_text(),
        seconds=20,
        what="the third SuperNode connected",
        details=lambda: "\n".join(said),
    )
    supervisor.terminate(signal.SIGTERM, None)
    assert finished(thread, codes) == 0  # stopped here: not an error
    assert supernode_script.count == 3
    retries = [line for line in said if line.startswith("the coordinator refused to activate")]
    assert len(retries) == 2 and all(line.endswith("retrying in 0s") for line in retries)
    assert not any("revoked" in line for line in said)
    # Every start's output is kept in the log, which only the institution can read.
    assert log.read_text().count(REFUSED) == 2
    assert log.stat().st_mode & 0o777 == 0o600


def test_refusals_that_outlast_the_window_give_up_and_name_both_causes(
    supervise, said, tmp_path, short_retries
):
    supernode_script = Scripted(tmp_path, (REFUSAL, 0, 1))
    assert supervise(supernode_script.command).run() == 1
    assert said[-1].startswith("the coordinator keeps refusing this institution's key")
    assert "revoked" in said[-1] and "another SuperNode with this key" in said[-1]
    # Retried every 0.1 s for 1.5 s (each start takes some of that): more than once, bounded.
    assert 2 <= supernode_script.count <= 16
    assert said.count(said[0]) == supernode_script.count - 1  # one "retrying" per retry


@pytest.mark.parametrize(("code", "exit_code"), [(3, 3), (0, 1)])
def test_any_other_ending_is_not_retried_and_fails_start_with_the_log(
    supervise, said, tmp_path, code, exit_code
):
    """A crash keeps its status; status 0 without a reason becomes 1 (`start` failed)."""
    script = Scripted(tmp_path, ([CONNECTED], 0, code))
    assert supervise(script.command).run() == exit_code
    assert script.count == 1
    [message] = said
    assert message.startswith(f"the SuperNode stopped (exit status {code}); see ")
    assert message.endswith("logs/supernode.log")


def test_a_supernode_killed_from_outside_is_not_retried(supervise, said, tmp_path):
    script = Scripted(tmp_path, ([CONNECTED], 60, 0))
    supervisor = supervise(script.command)
    thread, codes = run_in_thread(supervisor)
    wait_until(lambda: script.count == 1, seconds=20, what="the SuperNode started")
    [_, started] = supervisor.children  # the runner, then the SuperNode
    os.killpg(started.process.pid, signal.SIGKILL)
    assert finished(thread, codes) == 1
    assert script.count == 1
    assert said == [
        f"the SuperNode stopped (exit status -9); see {supervisor.logs / 'supernode.log'}"
    ]


def test_a_runner_that_stops_ends_start_and_stops_the_supernode(supervise, said, tmp_path):
    runner = [sys.executable, "-c", "import sys; print('runner failed', flush=True); sys.exit(4)"]
    supervisor = supervise(SLEEPER, runner)
    assert supervisor.run() == 1
    assert said[0].startswith("confide's runner stopped (exit status 4): no task can run")
    assert all(child.process.poll() is not None for child in supervisor.children)
    assert "runner failed" in (supervisor.logs / "runner.log").read_text()


def test_a_stop_while_waiting_to_retry_ends_at_once(supervise, said, tmp_path, monkeypatch):
    monkeypatch.setattr(supernode, "RETRY_PAUSE_SECONDS", 60.0)  # a stop must cut the wait
    supernode_script = Scripted(tmp_path, (REFUSAL, 0, 1))
    supervisor = supervise(supernode_script.command)
    thread, codes = run_in_thread(supervisor)
    wait_until(lambda: any("retrying in 60s" in line for line in said), seconds=20, what="a retry")
    supervisor.terminate(signal.SIGTERM, None)
    assert finished(thread, codes, seconds=10) == 0
    assert supernode_script.count == 1
