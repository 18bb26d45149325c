"""`confide-client start`: the institution's Flower SuperNode, with what `join` saved.

The SuperNode authenticates with the institution's private key and trusts only the
coordinator's CA. Its node config names nothing but the institution's state directory: the
ClientApp reads the data path, device and privacy limits from the settings file there, so
they stay the institution's own.

A SuperNode that stopped without signing off (killed, power loss, coordinator restarted at
the same time) still counts as online at the SuperLink until two missed heartbeats (60 s), and
the SuperLink refuses to activate it again before that; Flower's SuperNode then exits with
code 305. Restarting within that window is normal operations, so a refusal right at start is
retried for a bounded time; a SuperNode that was connected and then cut off (revoked) is not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from confide.client.data import STATE_DIR_KEY
from confide.client.institution import (
    SETTINGS,
    InstitutionConfig,
    InstitutionDir,
    InstitutionError,
    check_local_privacy,
)
from confide.tasks.environment import executable, flower_process_environment

CONNECTION_REFUSED = 305  # Flower's SUPERNODE_CONNECTION_ERROR exit code
RETRY_WINDOW_SECONDS = 90.0  # two 30 s heartbeats, plus margin
RETRY_PAUSE_SECONDS = 10.0
# A refusal later than this after launch means the SuperNode had been connected.
CONNECTED_SECONDS = 30.0


def supernode_command(directory: InstitutionDir) -> list[str]:
    config = directory.load()
    return [
        executable("flower-supernode"),
        "--root-certificates",
        str(directory.ca_certificate),
        "--superlink",
        config.superlink,
        "--auth-supernode-private-key",
        str(directory.private_key),
        "--node-config",
        f'{STATE_DIR_KEY}="{directory.root.resolve()}"',
        "--port",
        str(config.port),
    ]


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


def run_supernode(directory: InstitutionDir, say: Callable[[str], None]) -> int:
    """Run the SuperNode until it exits or SIGTERM/SIGINT; return an exit code for the CLI."""
    command = supernode_command(directory)
    config = directory.load()
    stop = threading.Event()
    running: list[subprocess.Popen[bytes]] = []

    def terminate(*_: object) -> None:
        stop.set()
        if running and running[-1].poll() is None:
            os.killpg(running[-1].pid, signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, terminate)
    for line in preflight(config):
        say(line)
    say(f"SuperNode for {config.name} connecting to {config.superlink} (TLS)")
    started = time.monotonic()
    while True:
        launched = time.monotonic()
        running.append(
            subprocess.Popen(command, env=flower_process_environment(), start_new_session=True)
        )
        code = running[-1].wait()
        if stop.is_set() or code in (0, -signal.SIGTERM):
            return 0
        if code != CONNECTION_REFUSED:
            return code
        if time.monotonic() - launched > CONNECTED_SECONDS:
            # It was connected and then dropped: revoked, or the coordinator went away.
            say(
                "the coordinator closed this institution's connection: its key was revoked "
                "(ask for a new join token) or the coordinator stopped; see the log above"
            )
            return code
        if time.monotonic() - started > RETRY_WINDOW_SECONDS:
            say(
                "the coordinator keeps refusing this institution's key: it was revoked "
                "(ask the coordinator for a new join token) or another SuperNode with this "
                "key is running"
            )
            return code
        say(
            "the coordinator refused to activate this SuperNode: a previous one may not have "
            f"signed off (it expires within 60 s); retrying in {RETRY_PAUSE_SECONDS:.0f}s"
        )
        if stop.wait(RETRY_PAUSE_SECONDS):
            return 0
