"""`confide-server start`: the SuperLink (TLS, node authentication) plus the enrollment service.

The SuperLink runs as a child process in its own session, so that stopping the coordinator
stops it and everything it spawned; the enrollment service runs in this process.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable

from confide.server.enrollment import EnrollmentService, FlowerRegistrar, serve
from confide.server.flower import executable, flower_environment, write_connection
from confide.server.settings import ServerSettings, StateDir
from confide.server.state import open_database
from confide.tasks.environment import stop_process_group, wait_until_listening

STARTUP_SECONDS = 90.0


class CoordinatorError(RuntimeError):
    """The coordinator could not start; the message says why and where to look."""


def run_coordinator(
    directory: StateDir, settings: ServerSettings, say: Callable[[str], None]
) -> None:
    """Start both services, report where they listen, and run until SIGTERM or SIGINT."""
    directory.logs.mkdir(exist_ok=True)
    log = directory.logs / "superlink.log"
    local = f"127.0.0.1:{settings.superlink_port}"
    write_connection(directory.flwr_home, local, directory.ca_certificate)
    command = [
        executable("flower-superlink"),
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
            env=flower_environment(directory.flwr_home, directory.runs),
        )
    enrollment = None
    engine = open_database(directory.database_url(settings))
    try:
        try:
            wait_until_listening(settings.superlink_port, superlink, STARTUP_SECONDS)
        except (ChildProcessError, TimeoutError) as error:
            raise CoordinatorError(f"the SuperLink {error}; see {log}") from None
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
        stop_process_group(superlink)
        engine.dispose()
