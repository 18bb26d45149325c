"""`confide-server dashboard`: the coordinator's live dashboard (confide.server.dashboard).

Kept apart from confide.server.cli, which registers this command, so that each file stays one
concern.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Annotated

import typer

from confide.common.terminal import errors, fail, output_console

console = output_console()
DEFAULT_PORT = 9190


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _bind(address: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one clear error line."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((address, port))
    except OSError as error:
        listener.close()
        raise fail(f"cannot listen on {address}:{port}: {error.strerror or error}") from None
    listener.listen(64)
    return listener


def dashboard(
    state: Annotated[Path, typer.Option("--dir", help="the coordinator's state directory")],
    port: Annotated[
        int, typer.Option(help="the port to serve the page on (0: any free one)", min=0, max=65535)
    ] = DEFAULT_PORT,
    address: Annotated[
        str,
        typer.Option(
            help="the address to listen on; the page authenticates no one, so anything but "
            "127.0.0.1 belongs behind your own authentication (docs/deployment.md)"
        ),
    ] = "127.0.0.1",
) -> None:
    """Serve a live, read-only web page of the coordinator: institutions, runs with their
    accuracy, loss and epsilon curves, refusals and the audit log. Ctrl-C stops it.

    It reads the state directory only (it can run while `start` runs, or without it) and
    shows institution names and the audit log to whoever reaches it: it listens on
    127.0.0.1 unless told otherwise."""
    import uvicorn

    from confide.server.dashboard import create_app
    from confide.server.dashboard_state import StateReader
    from confide.server.settings import StateDir

    directory = StateDir(state)
    try:
        reader = StateReader(directory)
    except OSError as error:
        raise fail(f"{state}: {error}") from None
    hosts = [address, *directory.load_settings().hosts]
    listener = _bind(address, port)
    bound = listener.getsockname()[1]
    shown = f"[{address}]" if ":" in address else address
    console.print(
        f"dashboard of {state}: http://{shown}:{bound}/ (Ctrl-C stops it)", highlight=False
    )
    if not _loopback(address):
        errors.print(
            f"warning: listening on {address}: the page authenticates no one and shows "
            "institution names and the audit log; put it behind your own authentication",
            highlight=False,
        )
    config = uvicorn.Config(
        create_app(reader, hosts=hosts), log_level="warning", access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn stops on Ctrl-C, then raises it again: a clean stop
        pass
    finally:
        listener.close()
    # Said whether uvicorn raised the Ctrl-C again or returned: it returns only once stopped
    # (a SIGINT it took while shutting down is not raised again, seen in CI).
    console.print("dashboard stopped", highlight=False)
