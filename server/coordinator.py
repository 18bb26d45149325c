"""`confide-server start` and `stop`: the SuperLink, its Fleet API front and the enrollment
service, as one coordinator process.

- The SuperLink (TLS, node authentication) runs as a child process in its own session, so
  that stopping the coordinator stops it and everything it spawned. It listens on
  127.0.0.1:`control_port` only: its Control API authenticates no one, so only the operator's
  tools on this host reach it (`STATE/flwr`, `confide.server.flower`).
- The Fleet API front (`confide.server.front`) listens on the public `bind:superlink_port`
  and passes SuperNodes' Fleet API calls on to it, refusing everything else.
- The enrollment service (gRPC, TLS) listens on `bind:enrollment_port`.
- `/metrics` (Prometheus, `confide.server.metrics`) listens on `--metrics-address`
  (127.0.0.1 by default; anything else is warned about: it authenticates no one) and
  `--metrics-port` (9464; 0: none), from threads of this process; its background questions
  to the SuperLink stop with it.

Starting fails safe: every port is checked before anything starts (a taken one is named, and
the front's is kept listening from then on), a second coordinator for the same state folder
is refused, and "ready" is printed only once all three listen.

`STATE/coordinator.pid` holds the coordinator's pid, and the coordinator holds an exclusive
`fcntl.flock` on it for its whole life: the lock, which the kernel releases when the process
ends however it ends, is what says a coordinator runs, so a second `start` is refused while
it is held and a file left by one that died is simply taken over. The pid is written to a
new file, locked before it is renamed into place, so a reader never sees it empty or half
written. `stop_coordinator` signals the pid that the lock holder wrote; a pid file it cannot
read (another user's coordinator) is reported as such and never deleted, and a pid that is
not `confide-server start` for the folder (as far as this user can tell) is not signalled.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
from sqlalchemy import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from confide.common.environment import stop_process_group
from confide.common.errors import CoordinatorError
from confide.common.metrics import Endpoint, MetricsServer, exposure_warning, port_taken
from confide.common.metrics import serve as serve_endpoint
from confide.server.audit import AuditError, AuditLog
from confide.server.enrollment import EnrollmentService, FlowerRegistrar, serve
from confide.server.flower import executable, flower_environment, write_connection
from confide.server.front import FleetFront, FrontError, FrontServer, bind_socket
from confide.server.settings import ServerSettings, StateDir
from confide.server.state import open_database

STARTUP_SECONDS = 90.0
STOP_SECONDS = 60.0  # the SuperLink's own grace (20 s) and the services' (5 s each), with margin


def run_coordinator(
    directory: StateDir,
    settings: ServerSettings,
    say: Callable[[str], None],
    *,
    metrics: Endpoint | None = None,
) -> None:
    """Start the three services (and `/metrics` at `metrics`, unless None or port 0), report
    where they listen, and run until SIGTERM or SIGINT. Whatever was started is stopped
    again, in reverse order, however this ends."""
    stop = _stop_on_signals()
    directory = StateDir(directory.root.resolve())  # children run elsewhere
    directory.logs.mkdir(exist_ok=True)
    with ExitStack() as stack:
        front_socket, control_port, engine = _claim(stack, directory, settings)
        endpoint = _serve_metrics(stack, directory, engine, metrics or Endpoint())
        audit = AuditLog(directory, engine)
        started: dict[str, str | int] = {}
        stack.callback(_record_stop, audit, started, say)
        superlink, log = _start_superlink(directory, control_port)
        stack.callback(stop_process_group, superlink)
        if not _wait_for_superlink(superlink, port=control_port, stop=stop, log=log):
            say("stopping")
            return
        front = _run_front(stack, directory, front_socket, control_port)
        _run_enrollment(stack, directory, settings, engine=engine, audit=audit)
        started.update(_record_start(audit, settings, control_port, endpoint))
        _announce(
            say,
            settings=settings,
            control_port=control_port,
            log=log,
            directory=directory,
            metrics=endpoint,
        )
        _supervise(superlink, front=front, stop=stop, log=log)
        say("stopping")


def _claim(
    stack: ExitStack, directory: StateDir, settings: ServerSettings
) -> tuple[socket.socket, int, Engine]:
    """What must be this coordinator's before anything starts, each released by `stack`:
    the pid file's lock, the ports (the front's socket, and the SuperLink's port), the
    database."""
    stack.enter_context(_pid_file(directory))
    front_socket, control_port = _claim_ports(settings)
    stack.callback(front_socket.close)
    engine = _open_database(directory, settings)
    stack.callback(engine.dispose)
    return front_socket, control_port, engine


def _serve_metrics(
    stack: ExitStack, directory: StateDir, engine: Engine, endpoint: Endpoint
) -> MetricsServer | None:
    """`/metrics`, bound before anything starts (a taken port refuses the start, naming it)
    and stopped with the coordinator; None when turned off (port 0)."""
    if endpoint.off:
        return None
    from confide.server.metrics import collector

    served = collector(directory, engine)
    try:
        server = serve_endpoint(served, endpoint, on_stop=served.close)
    except OSError as error:
        raise CoordinatorError(port_taken("the coordinator", endpoint, error)) from None
    stack.callback(server.stop)
    return server


def _run_front(
    stack: ExitStack, directory: StateDir, front_socket: socket.socket, control_port: int
) -> FrontServer:
    """The Fleet API front on its claimed socket, passing calls on to the SuperLink."""
    front = FrontServer(
        FleetFront(f"https://127.0.0.1:{control_port}", directory.ca_certificate),
        front_socket,
        certificate=directory.server_certificate,
        key=directory.server_key,
    )
    stack.callback(front.stop)
    _start_front(front)
    return front


def _run_enrollment(
    stack: ExitStack,
    directory: StateDir,
    settings: ServerSettings,
    *,
    engine: Engine,
    audit: AuditLog,
) -> None:
    """The enrollment service, registering keys with the SuperLink; it tells institutions
    the front's address."""
    service = EnrollmentService(
        directory.ca_certificate,
        engine,
        FlowerRegistrar(directory.flwr_home),
        f"{settings.hosts[0]}:{settings.superlink_port}",
        audit=audit,
    )
    enrollment = _serve_enrollment(service, directory, settings)
    stack.callback(lambda: enrollment.stop(grace=5).wait())


def _open_database(directory: StateDir, settings: ServerSettings) -> Engine:
    """The coordinator's database; one that cannot be opened refuses the start clearly."""
    url = directory.database_url(settings)
    try:
        return open_database(url)
    except SQLAlchemyError as error:
        cause = getattr(error, "orig", None) or error
        raise CoordinatorError(
            f"the database {_without_password(url)} cannot be opened: {cause}"
        ) from error


def _without_password(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:
        return "(settings.toml's `database`)"  # not even a URL: nothing to show


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _claim_ports(settings: ServerSettings) -> tuple[socket.socket, int]:
    """Check every port before anything starts: (the front's socket, bound and listening
    from now on, so nothing takes it while the SuperLink starts; the SuperLink's port, a free
    one if `control_port` is 0)."""
    front = _bind(
        "the Fleet API front",
        host=settings.bind,
        port=settings.superlink_port,
        setting="superlink_port",
    )
    try:
        probe = _bind(
            "the SuperLink", host="127.0.0.1", port=settings.control_port, setting="control_port"
        )
        control_port = probe.getsockname()[1]
        probe.close()
        _bind(
            "the enrollment service",
            host=settings.bind,
            port=settings.enrollment_port,
            setting="enrollment_port",
        ).close()
    except BaseException:
        front.close()
        raise
    return front, control_port


def _bind(service: str, *, host: str, port: int, setting: str) -> socket.socket:
    try:
        return bind_socket(host, port)
    except OSError as error:
        raise CoordinatorError(
            f"port {port} for {service} ({host}:{port}) is not free: "
            f"{error.strerror or error}. Stop what uses it, or set {setting} in settings.toml"
        ) from None


def _start_superlink(directory: StateDir, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    log = directory.logs / "superlink.log"
    write_connection(directory.flwr_home, f"127.0.0.1:{port}", directory.ca_certificate)
    with log.open("ab") as output:
        process = subprocess.Popen(
            superlink_command(directory, port),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=superlink_environment(directory),
        )
    return process, log


def superlink_environment(directory: StateDir) -> dict[str, str]:
    """The SuperLink's environment: `flower_environment`, which drops Flower's switches for
    further APIs (`FLWR_INTERNAL_*`)."""
    return flower_environment(directory.flwr_home, directory.runs, state=directory.root)


def superlink_command(directory: StateDir, port: int) -> list[str]:
    """Everything on 127.0.0.1: its HTTPS port, and the deprecated gRPC addresses too (Flower
    1.41 binds them only under the `FLWR_INTERNAL_*` switches its environment never has; if
    one got through, those APIs would still not be public). Flower logs a deprecation warning
    for each."""
    return [
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
        "127.0.0.1",
        "--port",
        str(port),
        "--control-api-address",
        "127.0.0.1:0",
        "--fleet-api-address",
        "127.0.0.1:0",
    ]


def _wait_for_superlink(
    process: subprocess.Popen[bytes], *, port: int, stop: threading.Event, log: Path
) -> bool:
    """True once the SuperLink accepts connections; False if told to stop meanwhile."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while not stop.is_set():
        if process.poll() is not None:
            raise CoordinatorError(
                f"the SuperLink exited with code {process.returncode} while starting; see {log}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            if time.monotonic() > deadline:
                raise CoordinatorError(
                    f"the SuperLink did not listen on 127.0.0.1:{port} within "
                    f"{STARTUP_SECONDS:.0f}s; see {log}"
                ) from None
            stop.wait(0.25)
    return False


def _start_front(front: FrontServer) -> None:
    try:
        front.start()
    except FrontError as error:
        raise CoordinatorError(str(error)) from None


def _serve_enrollment(
    service: EnrollmentService, directory: StateDir, settings: ServerSettings
) -> grpc.Server:
    address = f"{settings.bind}:{settings.enrollment_port}"
    try:
        server, _ = serve(
            service,
            address,
            server_key=directory.server_key,
            server_certificate=directory.server_certificate,
        )
    except OSError as error:
        raise CoordinatorError(f"the enrollment service: {error}") from None
    return server


def _record_start(
    audit: AuditLog,
    settings: ServerSettings,
    control_port: int,
    metrics: MetricsServer | None = None,
) -> dict[str, str | int]:
    """`service.started`; a log that cannot be written stops the start (fail safe)."""
    details: dict[str, str | int] = {
        "front": f"{settings.bind}:{settings.superlink_port}",
        "superlink": f"127.0.0.1:{control_port}",
        "enrollment": f"{settings.bind}:{settings.enrollment_port}",
        "pid": os.getpid(),
    }
    if metrics is not None:
        details["metrics"] = metrics.url
    try:
        audit.append("service.started", actor="coordinator", **details)
    except AuditError as error:
        raise CoordinatorError(f"the audit log: {error}") from None
    return details


def _record_stop(
    audit: AuditLog, started: dict[str, str | int], say: Callable[[str], None]
) -> None:
    """`service.stopped`, once every service stopped (only if `service.started` was written)."""
    if not started:
        return
    try:
        audit.append("service.stopped", actor="coordinator", **started)
    except AuditError as error:
        say(f"warning: the audit log: {error}")


def _announce(
    say: Callable[[str], None],
    *,
    settings: ServerSettings,
    control_port: int,
    log: Path,
    directory: StateDir,
    metrics: MetricsServer | None,
) -> None:
    say(
        f"Fleet API front (TLS, institutions' SuperNodes) listening on "
        f"{settings.bind}:{settings.superlink_port}"
    )
    say(
        f"SuperLink (institution authentication; Control API for this host's operator only) "
        f"listening on 127.0.0.1:{control_port}; log: {log}"
    )
    say(f"enrollment service (TLS) listening on {settings.bind}:{settings.enrollment_port}")
    if metrics is not None:
        say(f"metrics (Prometheus, plain HTTP) listening on {metrics.url}")
        if warning := exposure_warning("the coordinator", Endpoint(metrics.address, metrics.port)):
            say(warning)
    say(f"ready; stop with Ctrl-C, SIGTERM or `confide-server stop --dir {directory.root}`")


def _supervise(
    superlink: subprocess.Popen[bytes], *, front: FrontServer, stop: threading.Event, log: Path
) -> None:
    """Until told to stop; a SuperLink or front that dies ends the coordinator (an error)."""
    while not stop.wait(0.5):
        if superlink.poll() is not None:
            raise CoordinatorError(
                f"the SuperLink exited with code {superlink.returncode}; see {log}"
            )
        if not front.thread.is_alive():
            raise CoordinatorError("the Fleet API front stopped")


# -- the pid file, and `confide-server stop` --------------------------------------------------


@contextmanager
def _pid_file(directory: StateDir) -> Iterator[None]:
    """`STATE/coordinator.pid`, locked, while this coordinator runs (see the module
    docstring); `CoordinatorError` if another one holds it."""
    path = directory.pid_file
    held = _write_pid(path, _lock_pid_file(path))
    try:
        yield
    finally:
        try:
            if _same_file(held, path):
                path.unlink()  # still locked: no one takes it over meanwhile
        finally:
            os.close(held)  # releases the lock


def _lock_pid_file(path: Path) -> int:
    """A descriptor of the file now at `path`, exclusively locked by this process."""
    for _ in range(10):
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as error:
            raise CoordinatorError(
                f"{path}: {error.strerror}: a coordinator may be running as another user"
            ) from None
        except OSError as error:
            raise CoordinatorError(f"{path}: {error.strerror}") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            running = _read_pid(path)
            raise CoordinatorError(
                f"a coordinator for {path.parent} is already running"
                + (f" (pid {running})" if running is not None else "")
                + f"; stop it with `confide-server stop --dir {path.parent}`"
            ) from None
        if _same_file(descriptor, path):
            return descriptor
        os.close(descriptor)  # replaced or removed after it was opened: take the new one
    raise CoordinatorError(f"{path}: could not be locked (it keeps being replaced)")


def _write_pid(path: Path, held: int) -> int:
    """Put this process's pid at `path`, whole: written to a new file, locked, then renamed
    over the one `held` (locked until then, so no one locks the file in between). Returns
    the new file's descriptor, which holds the lock from now on."""
    staged = path.with_name(f".{path.name}.new")
    descriptor = -1
    try:
        staged.unlink(missing_ok=True)
        descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        os.fsync(descriptor)
        os.replace(staged, path)
    except OSError as error:
        if descriptor >= 0:
            os.close(descriptor)
            staged.unlink(missing_ok=True)
        raise CoordinatorError(f"{path}: could not be written: {error.strerror}") from None
    finally:
        os.close(held)
    return descriptor


def _same_file(descriptor: int, path: Path) -> bool:
    """Whether `path` still names the file open as `descriptor`."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def coordinator_pid(directory: StateDir, seconds: float = 2.0) -> int | None:
    """The pid of the coordinator running for `directory` (the one holding the lock on its
    pid file), None if none runs. `CoordinatorError` when it cannot be told: the pid file
    cannot be read (another user's coordinator), or stays without a pid (one starting)."""
    path = directory.pid_file
    deadline = time.monotonic() + seconds
    while True:
        try:
            held, pid = _pid_of_holder(path)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise CoordinatorError(
                f"cannot tell whether a coordinator runs for {directory.root}: {path}: "
                f"{error.strerror}; run this as the user the coordinator runs as"
            ) from None
        if not held:
            return None
        if pid is not None and _alive(pid):
            return pid
        if time.monotonic() > deadline:
            raise CoordinatorError(
                f"a coordinator for {directory.root} holds {path}, but the pid in it "
                f"({pid if pid is not None else 'not written yet'}) is no process here: it "
                "is starting (try again), or runs in another PID namespace (a container?)"
            )
        time.sleep(0.05)  # a start between locking its file and renaming it into place


def _pid_of_holder(path: Path) -> tuple[bool, int | None]:
    """(whether a process holds the lock on the file at `path`, the pid written in it)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(descriptor, 64).decode(errors="replace").strip()
            current = _same_file(descriptor, path)
            return True, int(text) if text.isdigit() and current else None
        return False, None  # closing the descriptor releases this probe's lock
    finally:
        os.close(descriptor)


def _remove_stale_pid_file(path: Path) -> bool:
    """Remove a pid file no coordinator holds, under its lock (never one being taken over or
    one this user cannot read); whether one was removed."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(descriptor, path):
            path.unlink()
            return True
    except OSError:
        pass
    finally:
        os.close(descriptor)
    return False


def is_coordinator(pid: int, root: Path) -> bool | None:
    """Whether process `pid` is `confide-server start` for the state folder `root`; None
    when this user cannot tell (another user's process, whose working folder is hidden)."""
    proc = Path("/proc") / str(pid)
    try:
        arguments = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except PermissionError:
        return None
    except OSError:
        return False  # no such process
    program = any("confide-server" in part or "confide.server.cli" in part for part in arguments)
    state = _dir_argument(arguments)
    if not program or "start" not in arguments or state is None:
        return False
    if Path(state).is_absolute():
        return Path(state).resolve() == root.resolve()
    try:
        cwd = Path(os.readlink(proc / "cwd"))
    except PermissionError:
        return None
    except OSError:
        return False
    return (cwd / state).resolve() == root.resolve()


def _dir_argument(arguments: list[str]) -> str | None:
    for index, argument in enumerate(arguments):
        if argument == "--dir" and index + 1 < len(arguments):
            return arguments[index + 1]
        if argument.startswith("--dir="):
            return argument.removeprefix("--dir=")
    return None


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return True  # it exists (kill said so); its state is just not readable here
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def stop_coordinator(directory: StateDir, seconds: float = STOP_SECONDS) -> int:
    """SIGTERM the coordinator of `directory` and wait until it exited; its pid."""
    pid = coordinator_pid(directory)
    if pid is None:
        stale = _remove_stale_pid_file(directory.pid_file)
        raise CoordinatorError(
            f"no coordinator is running for {directory.root}"
            + (" (its stale pid file was removed)" if stale else "")
        )
    if is_coordinator(pid, directory.root) is False and _alive(pid):
        raise CoordinatorError(
            f"{directory.pid_file} is held, but its pid {pid} is not `confide-server start "
            f"--dir {directory.root}` here (a coordinator in another PID namespace, such as a "
            "container?): stop it where it runs"
        )
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return pid  # it ended meanwhile
    except PermissionError:
        raise CoordinatorError(
            f"the coordinator for {directory.root} (pid {pid}) runs as another user: run "
            "`confide-server stop` as that user"
        ) from None
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            raise CoordinatorError(
                f"the coordinator (pid {pid}) did not stop within {seconds:.0f}s; see "
                f"{directory.logs / 'superlink.log'}"
            )
        time.sleep(0.2)
    return pid
