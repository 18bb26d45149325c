"""The one place the coordinator talks to Flower's own tools.

Flower's `flwr` CLI is its supported Control API client (register keys, start runs, list runs,
read logs). It reads its connections from `$FLWR_HOME/config.toml`; the coordinator keeps that
home inside its state directory, with one connection named `confide` to its own SuperLink.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from confide.common.environment import executable, flower_process_environment
from confide.common.errors import FlowerError

CONNECTION = "confide"
# The ServerApp writes each run's results here (set in the SuperLink's environment).
RESULTS_ENV = "CONFIDE_RESULTS_DIR"
# The ServerApp finds the coordinator's state folder here (enrolled institutions, audit log).
STATE_ENV = "CONFIDE_STATE_DIR"
# Flower's switches for APIs beside the ones the coordinator runs: in Flower 1.41 the
# SuperLink starts a gRPC Control API (`FLWR_INTERNAL_GRPC_CONTROL_API=1`, which
# authenticates no one) and a gRPC Fleet API (`FLWR_INTERNAL_GRPC_FLEET_API=1`), by default
# on 0.0.0.0, past the front. None may reach a Flower process from the operator's
# environment, nor any other `FLWR_INTERNAL_*` a later version reads.
DROPPED_PREFIX = "FLWR_INTERNAL_"


def flower_environment(
    flwr_home: Path, results: Path | None = None, *, state: Path | None = None
) -> dict[str, str]:
    """Environment of Flower's processes: quiet, offline, state in the coordinator's folder,
    and no `FLWR_INTERNAL_*` switch (`DROPPED_PREFIX`).

    `state`: the coordinator's state folder, for the ServerApp (`STATE_ENV`); absolute, as the
    SuperLink starts ServerApps in folders of its own."""
    extra = {"FLWR_HOME": str(flwr_home)}
    if results is not None:
        extra[RESULTS_ENV] = str(results)
    if state is not None:
        extra[STATE_ENV] = str(state.resolve())
    environment = flower_process_environment(**extra)
    return {
        name: value for name, value in environment.items() if not name.startswith(DROPPED_PREFIX)
    }


def write_connection(flwr_home: Path, address: str, ca_certificate: Path) -> None:
    """The `flwr` CLI connection the coordinator uses to reach its own SuperLink: `address`
    is the SuperLink's own port on 127.0.0.1 (`ServerSettings.control_port`), never the public
    front, which refuses the Control API (`confide.server.front`)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\n'
        f'root-certificates = "{ca_certificate.resolve()}"\n'
    )


def flwr_json(flwr_home: Path, *args: str, timeout: float = 60.0) -> dict[str, Any]:
    """Run `flwr ARGS --format json` against the coordinator's SuperLink; its reply as a dict.

    Raises `FlowerError` with Flower's message when the command fails or does not answer.
    """
    try:
        result = subprocess.run(
            [executable("flwr"), *args, "--format", "json"],
            capture_output=True,
            text=True,
            env=flower_environment(flwr_home),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise FlowerError(f"the SuperLink did not answer within {timeout:.0f}s") from None
    try:
        reply = json.loads(result.stdout[result.stdout.index("{") :])
    except ValueError:
        detail = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
        raise FlowerError(f"unexpected reply from flwr: {detail}") from None
    if not reply.get("success"):
        message = str(reply.get("error-message", "refused")).strip().splitlines()
        raise FlowerError(message[-1] if message else "refused")
    return reply
