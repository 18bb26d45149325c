"""What the tests that start real processes share: free ports on 127.0.0.1, bounded waits
that fail the test with what they waited for, the installed console scripts, a coordinator
or a bare SuperLink of a test's own, and stopping a process with everything it started.

Imported as `helpers`: pytest puts this folder on sys.path for tests/conftest.py
(the default `prepend` import mode, no package `__init__.py`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from confide.common.environment import FLOWER_DEFAULTS

BIN = Path(sys.executable).parent


def environment(**extra: str) -> dict[str, str]:
    """The environment for a process a test starts: this one's as it is now (tests/conftest.py
    gives each test a ledger index of its own), with wide, plain output, and `extra`."""
    return os.environ | {"COLUMNS": "200", "NO_COLOR": "1", "FLWR_TELEMETRY_ENABLED": "0"} | extra


def flower_environment(**extra: str) -> dict[str, str]:
    """`environment` for Flower's own processes: they start `flower-superexec` and `flwr-*`
    by name, and confide's defaults make them start apps promptly."""
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return environment(PATH=path, **FLOWER_DEFAULTS, **extra)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (the system's choice)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_until(
    condition: Callable[[], bool],
    *,
    seconds: float,
    what: str,
    pause: float = 0.2,
    process: subprocess.Popen[Any] | None = None,
    details: Callable[[], str] = str,
) -> None:
    """Poll `condition` until it holds; fail the test, naming `what` it waited for (and
    `details()`, such as a process's output), after `seconds`, or as soon as `process` (the
    one meant to bring it about) has exited."""
    deadline = time.monotonic() + seconds
    while not condition():
        if process is not None and process.poll() is not None and not condition():
            raise AssertionError(
                f"{what}: the process exited with {process.returncode} first\n{details()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds:.0f}s\n{details()}")
        time.sleep(pause)


def wait_for_port(port: int, process: subprocess.Popen[Any], seconds: float = 60) -> None:
    """Until `process` listens on 127.0.0.1:`port`."""
    wait_until(
        lambda: listening(port), seconds=seconds, what=f"listening on {port}", process=process
    )


def stop(process: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 30) -> int:
    """Signal the process group `process` leads (started with `start_new_session`), SIGKILL
    it after `grace` seconds, and reap it; its exit code. Whatever is left of the group once
    its leader exited (a SuperLink after its coordinator, say) is killed too."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    return process.returncode


def cli(
    script: str, *args: str, timeout: float = 120, **options: Any
) -> subprocess.CompletedProcess[str]:
    """An installed console script (`confide-server`, `confide-client`, `flwr`, ...) run to
    its end, as an operator runs it: wide, plain output, captured as text."""
    return subprocess.run(
        [str(BIN / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=options.pop("env", None) or environment(),
        **options,
    )


def flwr_json(home: Path, *args: str, timeout: float = 60) -> dict[str, Any]:
    """Flower's own CLI with the connections in `home` (`--format json`); its reply."""
    done = cli(
        "flwr", *args, "--format", "json", timeout=timeout, env=environment(FLWR_HOME=str(home))
    )
    assert "{" in done.stdout, f"flwr {' '.join(args)}: no JSON reply\n{done.stdout}{done.stderr}"
    return dict(json.loads(done.stdout[done.stdout.index("{") :]))


class Started:
    """A command started in its own session, its output (stdout and stderr) collected by a
    thread, so that lines arriving together are never left in a buffer a poll cannot see."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env or environment(),
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._collect, daemon=True)
        self.reader.start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, marker: str, seconds: float) -> None:
        """Until `marker` is in its output; fails if it exits without printing it or after
        `seconds`."""

        def printed() -> bool:
            if marker not in self.output and self.process.poll() is not None:
                self.reader.join(timeout=5)  # its last lines
            return marker in self.output

        wait_until(
            printed,
            seconds=seconds,
            what=f"{marker!r} in the output of {self.process.args[1:3]}",
            process=self.process,
            details=lambda: f"output:\n{self.output}",
        )

    def finish(self, sig: int = signal.SIGTERM, grace: float = 60) -> int:
        """Its exit code, once it and its group stopped (`stop`) and all its output is read."""
        code = stop(self.process, sig, grace)
        self.reader.join(timeout=5)
        return code


def confide(command: str, *args: str, env: dict[str, str] | None = None) -> Started:
    """`confide-server` or `confide-client` COMMAND started in its own session."""
    program, _, subcommand = command.partition(" ")
    return Started([str(BIN / program), subcommand, *args], env)


# -- a coordinator of the test's own -----------------------------------------------------------


def init_coordinator(state: Path, **ports: int) -> dict[str, int]:
    """`confide-server init` on 127.0.0.1 with free ports (or those given); the ports."""
    chosen = {"superlink": free_port(), "control": free_port(), "enrollment": free_port()} | ports
    created = cli(
        "confide-server", "init", "--dir", str(state), "--bind", "127.0.0.1",
        "--superlink-port", str(chosen["superlink"]),
        "--control-port", str(chosen["control"]),
        "--enrollment-port", str(chosen["enrollment"]),
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    return chosen


@contextmanager
def running_coordinator(
    state: Path, env: dict[str, str] | None = None, **ports: int
) -> Iterator[dict[str, Any]]:
    """A coordinator initialised in `state` and started (`confide-server start`) until it
    said "ready"; stopped, with its SuperLink, on the way out. Yields its `state`, ports
    (`superlink`, `control`, `enrollment`) and `started` (a `Started`)."""
    chosen = init_coordinator(state, **ports)
    started = confide("confide-server start", "--dir", str(state), env=environment(**(env or {})))
    try:
        started.wait_for("ready", 120)
        yield {"state": state, "started": started, **chosen}
    finally:
        # SIGTERM first: the coordinator then stops its SuperLink, which runs in a session of
        # its own and would outlive a SIGKILL of the coordinator.
        started.finish()


def new_token(state: Path, institution: str) -> str:
    """A join token for `institution` from the coordinator in `state`."""
    created = cli(
        "confide-server", "token", "create", "--dir", str(state), "--institution", institution
    )
    assert created.returncode == 0, created.stderr
    return created.stdout.strip()


# -- a bare SuperLink, and institutions' keys ----------------------------------------------------


def openssh_key() -> tuple[bytes, bytes]:
    """A new institution key pair: (private key in OpenSSH PEM, public key in OpenSSH form)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public


@contextmanager
def bare_superlink(state: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    """Flower's SuperLink alone (TLS with a new CA in `state`, SuperNode authentication on),
    on a free port of 127.0.0.1, with a connection for `flwr` in `state/flwr`; its port."""
    from confide.server import pki
    from confide.server.flower import write_connection

    ca_key, ca = pki.create_ca()
    server_key, server = pki.issue_server_certificate(ca_key, ca, ["localhost", "127.0.0.1"])
    pki.write_certificate(state / "ca.pem", ca)
    pki.write_certificate(state / "server.pem", server, ca)
    pki.write_private_key(state / "server.key", server_key)
    port = free_port()
    process = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(state / "ca.pem"),
            "--ssl-certfile", str(state / "server.pem"),
            "--ssl-keyfile", str(state / "server.key"),
            "--database", str(state / "superlink.db"),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1",
            "--port", str(port),
        ],
        env=flower_environment(FLWR_HOME=str(state / "flwr"), **(env or {})),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_port(port, process)
        write_connection(state / "flwr", f"127.0.0.1:{port}", state / "ca.pem")
        yield port
    finally:
        stop(process)


# -- processes, from Linux's /proc ---------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie nobody reaped yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def spawned_by(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            found.append(int(stat.parent.name))
    return found
