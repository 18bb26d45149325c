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

    python -m confide.client.flower_supernode --parent-pid PID [flower-supernode arguments]
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from confide.common.environment import executable

WATCH_SECONDS = 0.2  # as Flower's own parent monitor (flwr.supercore.app_utils)


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


def command(parent: int, arguments: Sequence[str]) -> list[str]:
    """The command that runs `flower-supernode arguments` following process `parent`."""
    module = "confide.client.flower_supernode"
    return [sys.executable, "-m", module, "--parent-pid", str(parent), *arguments]


def main(argv: Sequence[str]) -> None:
    if len(argv) < 2 or argv[0] != "--parent-pid" or not argv[1].isdigit():
        sys.exit("usage: python -m confide.client.flower_supernode --parent-pid PID [ARGS]")
    follow_parent(int(argv[1]))
    from flwr.supernode.cli import flower_supernode

    # Flower parses sys.argv, and names its telemetry event after the program's name.
    sys.argv = [executable("flower-supernode"), *argv[2:]]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
