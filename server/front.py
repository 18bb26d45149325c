"""The coordinator's public HTTPS port: Flower's Fleet API for institutions, nothing else.

Flower 1.41's SuperLink serves its Fleet API (what SuperNodes use), its Control API (start,
list and stop runs, read logs, register and unregister nodes) and its Runtime API on one port,
and the open-source build authenticates no Control caller: anyone who reaches that port with
the (public) CA certificate could `flwr run` an app of their own, or unregister institutions.
So the SuperLink listens on 127.0.0.1 only (`ServerSettings.control_port`, for the operator's
`flwr` in `STATE/flwr`), and this front listens on the public `bind:superlink_port`. It passes
on `POST /v1/fleet/<method>` for the methods of Flower's Fleet router (`FLEET_METHODS`) and
answers everything else itself with 403: Control and Runtime calls, `/docs` and the OpenAPI
schema, `/health` (SuperNodes never call it; the enrollment port serves liveness checks),
unknown paths and other methods. The path forwarded is the allowed constant, never the
caller's text, so no `..` or encoding can steer a request elsewhere; the query string is
dropped (the Fleet API reads none).

Flower reads a request's whole body before it checks who sent it, so the front bounds what
reaches it from callers it cannot authenticate itself: a Fleet call without Flower's three
node-authentication headers (`NODE_AUTH_HEADERS`, empty ones included) is answered 401 here,
and a body larger than `MAX_BODY_BYTES` (by its Content-Length, or counted as it streams when
it has none or lies) 413, neither passed on. The headers can be made up by anyone, so the
size cap is the bound that holds. It is 64 MiB: Flower 1.41 sends a model as one object per
`push-object` request, its arrays cut into chunks of at most 5 MiB
(`FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`), and the other Fleet requests carry ids and small
records, so a real request is a few MiB at most. At most `MAX_CONCURRENCY` connections and
requests are served at once (uvicorn answers 503 beyond, and SuperNodes retry), so what
callers can make the SuperLink hold at once is bounded too (128 x 64 MiB).

Headers: the Fleet API needs its content type, the node-authentication headers (Flower's
`flwr-public-key`, `flwr-signature`, `flwr-timestamp`) and the version headers
(`flwr-package-*`, `flwr-component-name`), so the front passes `flwr-*` and a few standard
ones (`_FORWARDED`) and drops the rest — hop-by-hop headers, `Host`, cookies, authorization
and `X-Forwarded-*` (the SuperLink trusts those from 127.0.0.1, which the front is). Bodies
stream both ways, so a large model is never held whole here. The SuperLink stays on TLS
behind the front (Flower requires it for `--enable-supernode-auth`): the front checks its
certificate against the coordinator's CA.

The front runs in the coordinator's process, a uvicorn server in a thread (`FrontServer`):
it lives and dies with the coordinator, needs no pid or supervision of its own, and serves a
socket the coordinator bound and put in listening state itself while checking its ports
(`bind_socket`), so no other process can take the port in between, however long the
SuperLink takes to start (connections made meanwhile wait in the socket's backlog). Its
work is small (one streamed request at a time per connection) and asynchronous, so the
coordinator's enrollment service is not starved by it.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import httpx
import uvicorn
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from confide.common.errors import FrontError

FLEET_PREFIX = "/v1/fleet/"
# Flower 1.41's `flwr.superlink.routers.fleet.router` (a test compares them).
FLEET_METHODS = frozenset(
    {
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    }
)
FLEET_PATHS = frozenset(FLEET_PREFIX + method for method in FLEET_METHODS)
# Flower 1.41's `FLEET_HTTP_PUBLIC_KEY_HEADER`, `FLEET_HTTP_SIGNATURE_HEADER` (both in
# `flwr.supercore.constant`) and `TIMESTAMP_HEADER` (`flwr.common.constant`); a test compares.
NODE_AUTH_HEADERS = ("flwr-public-key", "flwr-signature", "flwr-timestamp")
MAX_BODY_BYTES = 64 * 1024 * 1024  # see the module docstring
MAX_CONCURRENCY = 128  # connections and requests at once; uvicorn answers 503 beyond
REFUSAL = "refused: this port serves institutions' SuperNodes (Flower's Fleet API) only\n"
UNAUTHENTICATED = "refused: a Fleet API call must carry Flower's node authentication headers\n"
TOO_LARGE = "refused: a Fleet API request body may be at most {limit} bytes\n"
_FORWARDED = frozenset({"content-type", "content-length", "accept", "user-agent", "traceparent"})
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# uvicorn writes its own date; the SuperLink's server name is not the caller's business.
_NOT_RETURNED = _HOP_BY_HOP | {"date", "server"}


class _BodyTooLarge(Exception):
    """A request body went past `MAX_BODY_BYTES` while it streamed."""


def refusal_before_forwarding(headers: Headers, limit: int = MAX_BODY_BYTES) -> Response | None:
    """401 without the node-authentication headers, 413 for a declared body over `limit`
    (400 for a Content-Length that is no number); None if the call may be forwarded."""
    if not all(headers.get(name, "").strip() for name in NODE_AUTH_HEADERS):
        return PlainTextResponse(UNAUTHENTICATED, status_code=401)
    declared = headers.get("content-length")
    if declared is None:
        return None
    if not declared.strip().isdigit():
        return PlainTextResponse("refused: Content-Length is not a number\n", status_code=400)
    if int(declared) > limit:
        return too_large(limit)
    return None


def too_large(limit: int) -> Response:
    return PlainTextResponse(TOO_LARGE.format(limit=limit), status_code=413)


async def capped(chunks: AsyncIterator[bytes], limit: int = MAX_BODY_BYTES) -> AsyncIterator[bytes]:
    """`chunks` passed on as they come; `_BodyTooLarge` once more than `limit` bytes came
    (whatever the Content-Length said)."""
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > limit:
            raise _BodyTooLarge(f"more than {limit} bytes")
        yield chunk


def forwarded_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Of the caller's headers, those the Fleet API needs (see the module docstring)."""
    kept = {
        name.lower(): value
        for name, value in headers
        if name.lower() in _FORWARDED or name.lower().startswith(("flwr-", "x-flwr-"))
    }
    # The body is passed on as it came: no re-compression on the way back either.
    kept["accept-encoding"] = "identity"
    return kept


def returned_headers(headers: httpx.Headers) -> list[tuple[str, str]]:
    """The SuperLink's response headers, less hop-by-hop ones and its date and name."""
    return [(name, value) for name, value in headers.multi_items() if name not in _NOT_RETURNED]


class FleetFront:
    """The ASGI app: Fleet API calls go to `upstream` (`https://127.0.0.1:PORT`), verified
    against `ca_certificate`, with bodies of at most `max_body` bytes; every other request is
    refused (see the module docstring)."""

    def __init__(
        self,
        upstream: str,
        ca_certificate: Path,
        *,
        timeout: float = 120.0,
        max_body: int = MAX_BODY_BYTES,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.ca_certificate = ca_certificate
        self.timeout = httpx.Timeout(timeout, connect=10.0)
        self.max_body = max_body
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            response = await self._respond(Request(scope, receive))
            await response(scope, receive, send)
        else:  # a WebSocket: the Fleet API has none
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """One upstream client per event loop: opened at startup, closed at shutdown."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                context = ssl.create_default_context(cafile=str(self.ca_certificate))
                # trust_env=False: an operator's HTTPS_PROXY must not reroute 127.0.0.1.
                self._client = httpx.AsyncClient(
                    verify=context, timeout=self.timeout, trust_env=False
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _respond(self, request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or path not in FLEET_PATHS or self._client is None:
            return PlainTextResponse(REFUSAL, status_code=403)
        refusal = refusal_before_forwarding(request.headers, self.max_body)
        if refusal is not None:
            return refusal
        outgoing = self._client.build_request(
            "POST",
            self.upstream + path,
            headers=forwarded_headers(request.headers.items()),
            content=capped(request.stream(), self.max_body),
        )
        try:
            reply = await self._client.send(outgoing, stream=True)
        except _BodyTooLarge:
            return too_large(self.max_body)
        except httpx.TimeoutException:
            return PlainTextResponse("the SuperLink did not answer in time\n", status_code=504)
        except httpx.TransportError:
            return PlainTextResponse("the SuperLink is not reachable\n", status_code=503)
        return StreamingResponse(
            reply.aiter_raw(),
            status_code=reply.status_code,
            headers=dict(returned_headers(reply.headers)),
            background=BackgroundTask(reply.aclose),
        )


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port` and listening; `OSError` if the port is taken.

    SO_REUSEADDR, as every server sets it, so connections of an earlier coordinator still in
    TIME_WAIT do not block a restart. On Linux a socket that is only bound does not keep
    another SO_REUSEADDR socket from binding and listening on the same port; one that
    listens does, so it listens at once, and uvicorn serves it as it is (`FrontServer`).
    """
    family, kind, protocol, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen()
    except OSError:
        sock.close()
        raise
    return sock


class FrontServer:
    """An ASGI app (`FleetFront`) served over TLS on an already listening socket
    (`bind_socket`), in a thread of this process."""

    def __init__(self, app: ASGIApp, sock: socket.socket, *, certificate: Path, key: Path) -> None:
        config = uvicorn.Config(
            app,
            ssl_certfile=str(certificate),
            ssl_keyfile=str(key),
            log_config=None,  # the coordinator's logging stays as it is
            log_level="warning",
            access_log=False,
            lifespan="on",
            ws="none",
            proxy_headers=False,
            server_header=False,
            limit_concurrency=MAX_CONCURRENCY,
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.socket = sock
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="fleet-front", daemon=True
        )

    def start(self, seconds: float = 30.0) -> None:
        """Serve, and return once the socket accepts connections."""
        self.thread.start()
        deadline = time.monotonic() + seconds
        while not self.server.started:
            if not self.thread.is_alive():
                raise FrontError("the Fleet API front stopped while starting")
            if time.monotonic() > deadline:
                raise FrontError(f"the Fleet API front did not start within {seconds:.0f}s")
            time.sleep(0.05)

    def stop(self, seconds: float = 10.0) -> None:
        """Stop accepting, finish what is under way (up to uvicorn's grace), and return."""
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(seconds)
        self.socket.close()
