"""`confide-server start`: the SuperLink (TLS, node authentication) plus the enrollment service.

The SuperLink runs as a child process in its own session, so that stopping the coordinator
stops it and everything it spawned; the enrollment service runs in this process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from confide.server.enrollment import (
    EnrollmentService,
    FlowerRegistrar,
    serve,
    write_flower_connection,
)
from confide.server.settings import ServerSettings, StateDir
from confide.server.state import open_database

STARTUP_SECONDS = 90.0


class CoordinatorError(RuntimeError):
    """The coordinator could not start; the message says why and where to look."""


def flower_environment(directory: StateDir) -> dict[str, str]:
    """Flower's processes: quiet, offline, with their state in the state directory."""
    bin_dir = str(Path(sys.executable).parent)  # the SuperLink spawns flower-superexec
    return os.environ | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(directory.flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CoordinatorError(
                f"the SuperLink exited with code {process.returncode}; see {log}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.25)
    raise CoordinatorError(f"the SuperLink did not listen on port {port} in {STARTUP_SECONDS:.0f}s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_coordinator(
    directory: StateDir, settings: ServerSettings, say: Callable[[str], None]
) -> None:
    """Start both services, report where they listen, and run until SIGTERM or SIGINT."""
    directory.logs.mkdir(exist_ok=True)
    log = directory.logs / "superlink.log"
    local = f"127.0.0.1:{settings.superlink_port}"
    write_flower_connection(directory.flwr_home, local, directory.ca_certificate)
    command = [
        str(Path(sys.executable).with_name("flower-superlink")),
        "--ssl-ca-certfile",
        str(directory.ca_certificate),
        "--ssl-certfile",
        str(directory.server_certificate),
        "--ssl-keyfile",
        str(directory.server_key),
        "--database",
        str(directory.superlink_database),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        settings.bind,
        "--port",
        str(settings.superlink_port),
    ]
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with log.open("ab") as output:
        superlink = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=flower_environment(directory),
        )
    enrollment = None
    engine = open_database(directory.database_url(settings))
    try:
        _wait_for_port(settings.superlink_port, superlink, log)
        service = EnrollmentService(
            directory.ca_certificate,
            engine,
            FlowerRegistrar(directory.flwr_home),
            f"{settings.hosts[0]}:{settings.superlink_port}",
        )
        enrollment, _ = serve(
            service,
            f"{settings.bind}:{settings.enrollment_port}",
            directory.server_key,
            directory.server_certificate,
        )
        say(
            f"SuperLink (TLS, institution authentication) listening on "
            f"{settings.bind}:{settings.superlink_port}; log: {log}"
        )
        say(f"enrollment service (TLS) listening on {settings.bind}:{settings.enrollment_port}")
        say("ready; stop with Ctrl-C or SIGTERM")
        while not stop.wait(0.5):
            if superlink.poll() is not None:
                raise CoordinatorError(
                    f"the SuperLink exited with code {superlink.returncode}; see {log}"
                )
        say("stopping")
    finally:
        if enrollment is not None:
            enrollment.stop(grace=5).wait()
        _stop(superlink)
        engine.dispose()
