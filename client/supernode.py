"""`confide-client start`: the institution's Flower SuperNode and confide's runner, together.

The SuperNode authenticates with the institution's private key and trusts only the
coordinator's CA. Its node config names nothing but the institution's state directory: the
ClientApp reads the data path, device and privacy limits from the settings file there, so
they stay the institution's own. It runs with `--isolation process`: it never starts a
process for a run's app; `confide.client.runner`, started beside it, takes its tasks and
runs only confide's own ClientApp (see that module for the trust decision). The two share a
SuperExec secret written anew at each start (`superexec.secret`, mode 0600), the Runtime API
on 127.0.0.1 at the institution's `port`, and a Flower home inside the folder (`flwr/`), never
the user's `~/.flwr`. Their output goes to the console and to `logs/supernode.log` and
`logs/runner.log`.

Both are stopped together, and neither may outlive `start`: a SuperNode left running stays
online at the coordinator, holds the institution's activation and its port, and answers the
next `start`'s runner with a 401 (it holds the old secret). So `start`

- stops both on SIGTERM, SIGINT and SIGHUP (a closed terminal; an inherited SIG_IGN, as
  `nohup` sets, is kept);
- has them stop when it is gone, however it ended (SIGKILL included): each stops once
  `start` is no longer its parent; the SuperNode runs through
  `confide.client.flower_supernode` for that, and so signs off at the coordinator;
- refuses to start (exit code 2) while the port is taken: another SuperNode of the
  institution, or another program, is listening there.

`start` also serves the institution's `/metrics` (`confide.client.metrics`) from threads of
its own process, so that it lives and ends with `start`: where institution.toml says
(`metrics_port`, `metrics_address`, saved by `join`: 127.0.0.1:9465 unless it was told
otherwise; port 0 for none), or where `--metrics-port`/`--metrics-address` say for this
start. A port it cannot bind refuses the start (exit code 2); an address beyond loopback is
warned about (it authenticates no one).

How a SuperNode ends is read from what Flower 1.41 prints, since its exit status says little
(`flwr_exit` maps every error code, 305 included, to status 1):

- the coordinator refused to activate it: status 1 after "[code: 2004] Failed to activate
  SuperNode." A SuperNode that stopped without signing off (killed, power loss) still counts
  as online at the SuperLink until two missed heartbeats (60 s), and an unregistered key gets
  the same answer; restarting within that window is normal operations, so this is retried for
  a bounded time, then reported as a key revoked or in use elsewhere;
- the coordinator revoked its key while it was connected: its next request is refused (401),
  it signals itself and exits 0 after "SuperNode terminated gracefully.", which it also
  prints when stopped here. A SuperNode that printed its "SuperNode ID" and then ended
  gracefully without being asked was revoked: reported as such, and `start` fails.
"""

from __future__ import annotations

import enum
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from confide.client import flower_supernode
from confide.client.institution import (
    SETTINGS,
    STATE_DIR_KEY,
    InstitutionConfig,
    InstitutionDir,
    InstitutionError,
    check_local_privacy,
)
from confide.client.runner import RUNTIME_HOST, write_secret
from confide.common.environment import flower_process_environment, stop_process_group
from confide.common.metrics import Endpoint, MetricsServer, exposure_warning, port_taken, serve

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RETRY_WINDOW_SECONDS = 90.0  # two 30 s heartbeats, plus margin
RETRY_PAUSE_SECONDS = 10.0
FLOWER_HOME = "flwr"
LOGS = "logs"
# What Flower 1.41's SuperNode prints: connected, refused activation, ended on a signal.
CONNECTED = "SuperNode ID:"
ACTIVATION_REFUSED = "Failed to activate SuperNode."
GRACEFUL = "SuperNode terminated gracefully."
REVOKED_MESSAGE = (
    "this institution's key was revoked by the coordinator; ask for a new join token "
    "(the SuperNode was connected, then the coordinator refused its key)"
)


class Ending(enum.Enum):
    STOPPED = "stopped here"
    REVOKED = "revoked while connected"
    REFUSED = "activation refused"
    FAILED = "anything else"


@dataclass
class Seen:
    """What the SuperNode printed that tells how it ended."""

    connected: bool = False
    refused: bool = False
    graceful: bool = False

    def read(self, line: str) -> None:
        self.connected |= CONNECTED in line
        self.refused |= ACTIVATION_REFUSED in line
        self.graceful |= GRACEFUL in line


def classify(code: int, seen: Seen, *, stopping: bool) -> Ending:
    """How a SuperNode ended, from its exit status and its output (module docstring)."""
    if stopping:
        return Ending.STOPPED
    if code == 0 and seen.connected and seen.graceful:
        return Ending.REVOKED
    if code != 0 and seen.refused and not seen.connected:
        return Ending.REFUSED
    return Ending.FAILED


def supernode_command(
    directory: InstitutionDir, secret: Path, parent: int | None = None
) -> list[str]:
    """Flower's SuperNode for this institution, stopping once `parent` (default: this
    process) is no longer its parent (`confide.client.flower_supernode`)."""
    config = directory.load()
    return flower_supernode.command(
        parent or os.getpid(),
        [
            "--root-certificates",
            str(directory.ca_certificate),
            "--superlink",
            config.superlink,
            "--auth-supernode-private-key",
            str(directory.private_key),
            "--node-config",
            f'{STATE_DIR_KEY}="{directory.root.resolve()}"',
            "--isolation",
            "process",
            "--host",
            RUNTIME_HOST,
            "--port",
            str(config.port),
            "--superexec-auth-secret-file",
            str(secret),
        ],
    )


def runner_command(directory: InstitutionDir, parent: int) -> list[str]:
    """confide's runner for this institution, stopping once `parent` is no longer its
    parent."""
    root = str(directory.root.resolve())
    module = "confide.client.runner"
    return [sys.executable, "-m", module, "--dir", root, "--parent-pid", str(parent)]


def preflight(config: InstitutionConfig) -> list[str]:
    """Local checks of the settings against the data before the SuperNode starts
    (InstitutionError if they would weaken the guarantee); returns lines to show."""
    from confide.privacy.report import NOISE_GENERATORS, noise_generator
    from confide.tasks.datasets import DatasetError, read_file
    from confide.tasks.splits import training_size

    try:
        _, labels = read_file(config.data, config.label_column)
    except DatasetError as error:
        raise InstitutionError(f"{SETTINGS}: data: {error}") from None
    warnings = check_local_privacy(
        declared_examples=config.declared_examples,
        max_delta=config.privacy.max_delta,
        training_examples=max(1, training_size(len(labels), config.validation_fraction)),
    )
    # A deployed institution's round seeds come from the OS CSPRNG (no noise seed).
    noise = NOISE_GENERATORS[noise_generator(config.noise_generator, None)]
    return [f"warning: {line}" for line in warnings] + [
        f"declared size {config.declared_examples} (published); DP-SGD noise from {noise}"
    ]


def check_port(port: int) -> None:
    """InstitutionError (exit code 2) if 127.0.0.1:`port`, the Runtime API's, is taken. The
    probe sets SO_REUSEADDR, as the SuperNode's server does: a port left in TIME_WAIT by the
    previous SuperNode is free, one a process listens on is not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((RUNTIME_HOST, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise InstitutionError(
                    f"{RUNTIME_HOST}:{port}, this institution's local Runtime API port, is "
                    "taken: another SuperNode of this institution may still be running (stop "
                    "it, or wait for it to exit), or another program listens there"
                ) from None
            raise InstitutionError(f"{RUNTIME_HOST}:{port} cannot be used: {error}") from None


@dataclass
class Child:
    """A process in its own session whose output is copied to the console and a log file."""

    process: subprocess.Popen[bytes]
    reader: threading.Thread

    @classmethod
    def start(
        cls,
        command: list[str],
        *,
        env: dict[str, str],
        log: Path,
        on_line: Callable[[str], None],
    ) -> Child:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert process.stdout is not None
        reader = threading.Thread(target=_tee, args=(process.stdout, log, on_line), daemon=True)
        reader.start()
        return cls(process, reader)

    def ended(self) -> int:
        """Its exit status, once all its output is read."""
        code = self.process.wait()
        self.reader.join(timeout=5)
        return code


def _tee(stream: IO[bytes], log: Path, on_line: Callable[[str], None]) -> None:
    """Copy each line to the console and the log (mode 0600: it may name local paths). A
    copy that fails (a closed terminal, a full disk) stops only that copy: a reader that
    stopped would leave the child blocked on a full pipe."""
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(descriptor, "ab") as sink:
        targets: list[IO[bytes]] = [sys.stdout.buffer, sink]
        for line in stream:
            targets = [target for target in targets if _copied(line, target)]
            on_line(line.decode("utf-8", errors="replace"))


def _copied(line: bytes, target: IO[bytes]) -> bool:
    try:
        target.write(line)
        target.flush()
    except (OSError, ValueError):
        return False
    return True


def _private_folder(path: Path) -> Path:
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)
    return path


class Supervisor:
    """The SuperNode (restarted while its activation is refused) and the runner, together."""

    def __init__(self, directory: InstitutionDir, say: Callable[[str], None]) -> None:
        self.directory = directory
        self.say = say
        self.stop = threading.Event()
        # Taken by `terminate` and around each start. Reentrant: a signal handler runs on
        # the main thread, possibly inside `_start`, which holds it.
        self.lock = threading.RLock()
        self.children: list[Child] = []
        root = directory.root
        self.logs = _private_folder(root / LOGS)
        self.secret = write_secret(root)
        self.env = flower_process_environment(
            FLWR_HOME=str(_private_folder(root / FLOWER_HOME)), PYTHONUNBUFFERED="1"
        )

    def terminate(self, *_: object) -> None:
        """SIGTERM/SIGINT/SIGHUP: stop both (each leads its own process group), and start
        nothing more."""
        with self.lock:
            self.stop.set()
            for child in self.children:
                _signal(child)

    def run(self) -> int:
        runner = self._start(runner_command(self.directory, os.getpid()), "runner.log")
        if runner is None:
            return 0
        try:
            return self._supernodes(runner)
        finally:
            for child in reversed(self.children):
                stop_process_group(child.process)

    def _start(self, command: list[str], log: str, seen: Seen | None = None) -> Child | None:
        """The child, started and listed for `terminate`; None once stopping (nothing is
        started). A signal handled on this thread between the check and the listing finds
        the lock held by this thread, so the stop is checked again once the child is listed:
        whichever way they interleave, `terminate` or this check signals the child."""
        with self.lock:
            if self.stop.is_set():
                return None
            on_line = seen.read if seen else _ignore
            child = Child.start(command, env=self.env, log=self.logs / log, on_line=on_line)
            self.children.append(child)
            if self.stop.is_set():
                _signal(child)
        return child

    def _supernodes(self, runner: Child) -> int:
        """Run the SuperNode until it ends for good; an exit code for the CLI."""
        started = time.monotonic()
        while True:
            seen = Seen()
            check_port(self.directory.load().port)  # free again after a refused activation?
            supernode = self._start(
                supernode_command(self.directory, self.secret), "supernode.log", seen
            )
            if supernode is None:
                return 0
            while supernode.process.poll() is None and runner.process.poll() is None:
                self.stop.wait(0.2)
            if runner.process.poll() is not None and not self.stop.is_set():
                self.say(
                    f"confide's runner stopped (exit status {runner.ended()}): no task can run; "
                    f"see {self.logs / 'runner.log'}"
                )
                return 1
            ending = classify(supernode.ended(), seen, stopping=self.stop.is_set())
            if ending is not Ending.REFUSED:
                return self._ended(ending, supernode.process.returncode)
            if time.monotonic() - started > RETRY_WINDOW_SECONDS:
                self.say(
                    "the coordinator keeps refusing this institution's key: it was revoked "
                    "(ask the coordinator for a new join token) or another SuperNode with this "
                    "key is running"
                )
                return 1
            self.say(
                "the coordinator refused to activate this SuperNode: a previous one may not "
                f"have signed off (it expires within 60 s); retrying in {RETRY_PAUSE_SECONDS:.0f}s"
            )
            if self.stop.wait(RETRY_PAUSE_SECONDS):
                return 0

    def _ended(self, ending: Ending, code: int) -> int:
        if ending is Ending.STOPPED:
            return 0
        if ending is Ending.REVOKED:
            self.say(REVOKED_MESSAGE)
            return 1
        self.say(f"the SuperNode stopped (exit status {code}); see {self.logs / 'supernode.log'}")
        return code if code > 0 else 1


def _signal(child: Child) -> None:
    """SIGTERM the child's process group, if it still runs."""
    if child.process.poll() is None:
        os.killpg(child.process.pid, signal.SIGTERM)


def _ignore(_line: str) -> None:
    return None


def handle_stop_signals(handler: Callable[[int, object], None]) -> None:
    """`handler` for SIGTERM, SIGINT and SIGHUP; a SIGHUP ignored by whoever started this
    process (`nohup`) stays ignored."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is not None and signal.getsignal(hangup) != signal.SIG_IGN:
        signal.signal(hangup, handler)


def metrics_endpoint(
    config: InstitutionConfig, *, port: int | None = None, address: str | None = None
) -> Endpoint:
    """Where `/metrics` listens: `port` and `address` (this start's options) where given,
    else what institution.toml saved."""
    return Endpoint(
        address if address is not None else config.metrics_address,
        port if port is not None else config.metrics_port,
    )


def run_supernode(
    directory: InstitutionDir,
    say: Callable[[str], None],
    *,
    metrics_port: int | None = None,
    metrics_address: str | None = None,
) -> int:
    """Run the SuperNode and the runner until one ends or SIGTERM/SIGINT/SIGHUP, with
    `/metrics` where institution.toml says unless `metrics_port`/`metrics_address` say
    otherwise (port 0: none); an exit code (InstitutionError, exit code 2, if the
    institution's port or the metrics port is taken)."""
    config = directory.load()
    check_port(config.port)  # before anything is written: the secret, the logs
    for line in preflight(config):
        say(line)
    metrics = metrics_endpoint(config, port=metrics_port, address=metrics_address)
    endpoint = serve_metrics(directory, metrics)
    try:
        supervisor = Supervisor(directory, say)
        handle_stop_signals(supervisor.terminate)
        say(
            f"SuperNode for {config.name} connecting to {config.superlink} (TLS); only "
            f"confide's own ClientApp runs here; logs in {supervisor.logs}"
        )
        if endpoint is not None:
            say(f"metrics (Prometheus, plain HTTP) listening on {endpoint.url}")
            if warning := exposure_warning("this institution", metrics):
                say(warning)
        return supervisor.run()
    finally:
        if endpoint is not None:
            endpoint.stop()


def serve_metrics(directory: InstitutionDir, endpoint: Endpoint) -> MetricsServer | None:
    """The institution's `/metrics` (None when turned off); InstitutionError (exit code 2)
    if its port cannot be bound."""
    if endpoint.off:
        return None
    from confide.client.metrics import InstitutionCollector

    try:
        return serve(InstitutionCollector(directory.root), endpoint)
    except OSError as error:
        raise InstitutionError(
            f"{port_taken('the institution', endpoint, error)} (for every start: "
            f"metrics_port in {SETTINGS})"
        ) from None
