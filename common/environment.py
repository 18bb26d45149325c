"""Environment for Flower's processes, the same for coordinator, institution and simulation:
no telemetry, no update checks, and prompt process starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

FLOWER_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # How often Flower's SuperExec looks for a ServerApp/ClientApp to start (default 1 s). A
    # deployed round starts one process per message, so this wait is paid on every message.
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


def executable(name: str) -> str:
    """A console script installed next to this interpreter (flwr, flower-superlink, ...)."""
    return str(Path(sys.executable).with_name(name))


def flower_process_environment(**extra: str) -> dict[str, str]:
    """This process's environment plus Flower's defaults and `extra`, with this interpreter's
    scripts first on PATH (Flower's processes start `flower-superexec` and `flwr-*` by name)."""
    bin_dir = str(Path(sys.executable).parent)
    return (
        os.environ
        | {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        | FLOWER_DEFAULTS
        | extra
    )


def wait_until_listening(port: int, process: subprocess.Popen[bytes], seconds: float) -> None:
    """Wait until something accepts connections on 127.0.0.1:`port`.

    Raises `ChildProcessError` if `process` (the one meant to listen) exits first and
    `TimeoutError` after `seconds`.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ChildProcessError(f"exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"did not listen on port {port} in {seconds:.0f}s")


def stop_process_group(process: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM the session `process` leads (Flower's processes spawn their own children), then
    SIGKILL it if it has not exited after `grace` seconds."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
