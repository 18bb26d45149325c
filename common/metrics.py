"""The `/metrics` endpoint (Prometheus text format) that `confide-server start` and
`confide-client start` serve beside their work, for the operator's own monitoring.

Each serves one collector of its own (`confide.server.metrics`, `confide.client.metrics`) from
a registry of its own, not prometheus_client's global one: the endpoint shows confide's
figures and nothing else, computed from the state folder when it is scraped. It binds
127.0.0.1 unless told otherwise and sends nothing anywhere: Prometheus (or `curl`) asks. It
authenticates no one, so an address other than loopback is warned about (`exposure_warning`),
as the dashboard's is.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated
from wsgiref.simple_server import WSGIServer

import typer
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.registry import Collector

LOOPBACK = "127.0.0.1"
OFF = 0  # `--metrics-port 0`: no endpoint

# The commands' options (each command gives its own default port); the compose file sets the
# address through the environment, which the institution's entry point does not pass on as
# arguments.
PortOption = Annotated[
    int,
    typer.Option(
        min=0,
        max=65535,
        envvar="CONFIDE_METRICS_PORT",
        help="port of /metrics (Prometheus, plain HTTP); 0: serve none",
    ),
]
AddressOption = Annotated[
    str,
    typer.Option(
        envvar="CONFIDE_METRICS_ADDRESS",
        help="address /metrics listens on (0.0.0.0 in a container, for Prometheus beside it)",
    ),
]
# The institution's: no default here, so that `start` can tell an option (or its environment
# variable) from none given, and then use what `join` saved in institution.toml.
SavedPortOption = Annotated[
    int | None,
    typer.Option(
        min=0,
        max=65535,
        envvar="CONFIDE_METRICS_PORT",
        help="port of /metrics (Prometheus, plain HTTP); 0: serve none (default: "
        "institution.toml's metrics_port, which join saves: 9465 unless given)",
        show_default=False,
    ),
]
SavedAddressOption = Annotated[
    str | None,
    typer.Option(
        envvar="CONFIDE_METRICS_ADDRESS",
        help="address /metrics listens on (0.0.0.0 in a container, for Prometheus beside it) "
        "(default: institution.toml's metrics_address, which join saves: 127.0.0.1 unless "
        "given)",
        show_default=False,
    ),
]


@dataclass(frozen=True)
class Endpoint:
    """Where `/metrics` is to listen (`--metrics-address`, `--metrics-port`); port 0: none."""

    address: str = LOOPBACK
    port: int = OFF

    @property
    def off(self) -> bool:
        return self.port == OFF


def loopback(address: str) -> bool:
    """Whether `address` reaches this host only (127.0.0.0/8, ::1, `localhost`)."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def exposure_warning(service: str, endpoint: Endpoint) -> str | None:
    """The warning for an endpoint beyond loopback (None on loopback, or when off): it
    authenticates no one, and shows names and figures to whoever reaches it."""
    if endpoint.off or loopback(endpoint.address):
        return None
    return (
        f"warning: {service}'s metrics listen on {endpoint.address}: /metrics authenticates "
        "no one and shows names and figures to whoever reaches it; keep it on a network only "
        "your monitoring reaches"
    )


def check_bindable(endpoint: Endpoint) -> None:
    """OSError if `endpoint` could not be served now (its port taken, or its address not one
    of this host's): checked by `join` before it enrolls, so that a port it would save and
    serve refuses the join while nothing is written. Bound as prometheus_client's server
    binds (SO_REUSEADDR, the address's own family), and released at once."""
    if endpoint.off:
        return
    family, _, _, _, address = socket.getaddrinfo(
        endpoint.address, endpoint.port, type=socket.SOCK_STREAM
    )[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)


@dataclass
class MetricsServer:
    """A running endpoint: where it listens, and how to stop it."""

    address: str
    port: int
    server: WSGIServer
    thread: threading.Thread
    # What else ends with the endpoint: a collector's background work (`serve`'s `on_stop`).
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and release the port (a scrape in flight ends with its thread), then
        whatever was to end with it."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        for stop in self.on_stop:
            stop()


def serve(
    collector: Collector, endpoint: Endpoint, *, on_stop: Callable[[], None] | None = None
) -> MetricsServer:
    """Serve `collector` alone at http://ADDRESS:PORT/metrics from threads of this process;
    OSError if the port cannot be bound (taken, or not an address of this host). `on_stop`
    runs when the endpoint stops (the collector's background refresh, say)."""
    registry = CollectorRegistry(auto_describe=False)  # collect() runs on a scrape only
    registry.register(collector)
    server, thread = start_http_server(endpoint.port, addr=endpoint.address, registry=registry)
    stops = [on_stop] if on_stop is not None else []
    return MetricsServer(endpoint.address, int(server.server_port), server, thread, stops)


def port_taken(service: str, endpoint: Endpoint, error: OSError) -> str:
    """The message for a `/metrics` port that cannot be bound."""
    return (
        f"port {endpoint.port} for {service}'s metrics ({endpoint.address}:{endpoint.port}) "
        f"cannot be used: {error.strerror or error}. Choose another with --metrics-port, "
        "or serve none with --metrics-port 0"
    )
