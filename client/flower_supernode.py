"""Flower's SuperNode as `confide-client start` runs it: it stops, once and gracefully, when
`start` is gone, however `start` ended.

A SuperNode that outlives `start` (a closed terminal, `kill -9`, a crash) stays online at
the coordinator, holds the institution's activation and its Runtime API port, and answers the
next `start`'s runner with a 401 (it holds the old SuperExec secret). `flower-supernode` has
no option to follow its parent (`flower-superexec` has `--parent-pid`), so `start` runs it
through this module: Flower's own `flower_supernode()`, in this process, with a thread that
raises SIGINT once this process's parent is no longer `--parent-pid`. Flower's handler
answers that SIGINT as it answers Ctrl-C: it signs the node off at the coordinator and exits.

The parent is compared by `os.getppid()`: a parent that died is no longer this process's
parent, even while nobody has reaped it yet (a zombie still answers `kill(pid, 0)`).

Not Linux's PR_SET_PDEATHSIG: the kernel sends that signal at every reparenting, once per
thread of `start` that exits after the one that started the child (`start` copies each
child's output on threads), and Flower's handler restores each stop signal's default action
at the first: the next one killed the SuperNode before it signed off. One SIGINT does not.

It also makes the SuperNode prompt (`prompt_pulls`). Flower 1.41's SuperNode loop sleeps a
hard-coded 3 s after every pull that brought no message, and 0.5 s between checks for a reply
to send: a message waits 1.5 s on average (up to 3 s) before the node sees it, and a reply up
to 0.5 s, per message and institution, whatever the model. There is no option for either
(flwr issue #3670 asks for a warm, prompt ClientApp), so this process replaces the `time`
module that `flwr.supernode.start_client_internal` sleeps with by one whose `sleep` maps
those two pauses to `PULL_SECONDS` and `REPLY_SECONDS`; every other call goes to `time`.
Nothing else changes: the same pulls, authenticated the same way, only sooner. A pull is one
small authenticated gRPC request to the coordinator, so the short pause holds only while the
node is busy: once it has handled no message for `IDLE_SECONDS`, it pulls every 3 s again
(the first message of a job after a long idle waits as long as under Flower; the rounds that
follow do not).

    python -m confide.client.flower_supernode --parent-pid PID [flower-supernode arguments]
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence

from confide.common.environment import executable

WATCH_SECONDS = 0.2  # as Flower's own parent monitor (flwr.supercore.app_utils)
PULL_SECONDS = 0.5  # after a pull that brought no message (Flower: 3 s)
REPLY_SECONDS = 0.1  # between checks for the ClientApp's reply (Flower: 0.5 s)
# Idle this long (no message handled), the node pulls every 3 s again, as Flower does: a
# job's rounds keep it prompt, an idle institution does not cost the coordinator 2 pulls/s.
IDLE_SECONDS = 60.0
# The pauses `flwr.supernode.start_client_internal` sleeps, as written in Flower 1.41.
_IDLE_PAUSE, _REPLY_PAUSE = 3, 0.5
_FLOWER_SLEEPS = ("time.sleep(3)", "time.sleep(0.5)")


def follow_parent(parent: int, pause: float = WATCH_SECONDS) -> threading.Thread:
    """Raise SIGINT in this process, once, when its parent is no longer `parent` (at once
    if it already is not)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(pause)
        signal.raise_signal(signal.SIGINT)

    thread = threading.Thread(target=watch, name="follow-parent", daemon=True)
    thread.start()
    return thread


def prompt_pulls(*, sleeper: Callable[[float], None] = time.sleep) -> types.SimpleNamespace:
    """Make Flower's SuperNode loop pull and push promptly (module docstring); return the
    stand-in for `time` it now uses, whose pauses go to `sleeper` (a test records them).
    Raises RuntimeError if Flower's loop no longer sleeps with `time` as Flower 1.41 did (a
    Flower upgrade changed it: then this needs reading again)."""
    import inspect

    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop)
    if getattr(loop, "time", None) is not time or not all(p in source for p in _FLOWER_SLEEPS):
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer sleeps with `time` as Flower 1.41 "
            "did (time.sleep(3) when idle, time.sleep(0.5) for a reply): check "
            "confide.client.flower_supernode.prompt_pulls against this Flower version"
        )
    active = [time.monotonic()]  # when the node last handled a message

    def sleep(seconds: float) -> None:
        if seconds == _REPLY_PAUSE:  # waiting for a reply: a message is being handled
            active[0] = time.monotonic()
            sleeper(REPLY_SECONDS)
        elif seconds == _IDLE_PAUSE and time.monotonic() - active[0] < IDLE_SECONDS:
            sleeper(PULL_SECONDS)
        else:
            sleeper(seconds)

    prompt = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time)})
    prompt.sleep = sleep
    loop.time = prompt  # type: ignore[assignment]
    return prompt


def command(parent: int, arguments: Sequence[str]) -> list[str]:
    """The command that runs `flower-supernode arguments` following process `parent`."""
    module = "confide.client.flower_supernode"
    return [sys.executable, "-m", module, "--parent-pid", str(parent), *arguments]


def main(argv: Sequence[str]) -> None:
    if len(argv) < 2 or argv[0] != "--parent-pid" or not argv[1].isdigit():
        sys.exit("usage: python -m confide.client.flower_supernode --parent-pid PID [ARGS]")
    follow_parent(int(argv[1]))
    prompt_pulls()
    from flwr.supernode.cli import flower_supernode

    # Flower parses sys.argv, and names its telemetry event after the program's name.
    sys.argv = [executable("flower-supernode"), *argv[2:]]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
