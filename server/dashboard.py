"""The coordinator's live dashboard: a small read-only web page over its state directory.

`confide-server dashboard --dir STATE` (confide.server.cli_dashboard) serves it: the enrolled
institutions and their status, every run with its accuracy, loss and epsilon curves and its
rounds, the institutions' spend and refusals, and the newest audit entries with whether the
log verifies. What it shows is a `confide.server.dashboard_state.Snapshot`, read afresh for
each request.

The page is rendered here, on the server, from that snapshot; a small script
(static/dashboard.js) then asks `/api/state` every few seconds and updates the tables and
charts in place, so a running job's rounds appear as its ServerApp checkpoints them. The chart
library (uPlot) is a file of the package (static/, with its licence): nothing is fetched from
elsewhere at run time and there is no build step.

Everything shown comes from files and a database others write (institution names, job names,
refusal reasons, audit details), so it is untrusted text: every value is HTML-escaped here and
set as text (never as HTML) by the script. The responses carry a Content-Security-Policy that
allows only this server's own scripts, styles and API (no inline script, no other origin),
and refuse framing. Requests naming another host are refused (`_AllowedHosts`), so a web page
elsewhere cannot read the dashboard through DNS rebinding.

Every epsilon is shown with its delta (in its column's heading, or beside it), and an
infinite one as "unbounded" (no finite guarantee), never as a blank that would read as "no
DP" (see confide.server.dashboard_state).

It shows institution names and the audit log, and authenticates no one: it listens on
127.0.0.1 by default, and exposing it means putting it behind the operator's own
authentication (a reverse proxy, an SSH tunnel) — see docs/deployment.md.
"""

from __future__ import annotations

import html
import threading
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from confide.privacy.report import UNBOUNDED
from confide.server.dashboard_state import (
    AuditView,
    InstitutionView,
    RunView,
    Snapshot,
    StateReader,
)

STATIC = Path(__file__).parent / "static"
POLL_SECONDS = 2.0
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def host_name(header: str) -> str | None:
    """The host a Host header names, without its port and an IPv6 literal's brackets, in
    lower case ("[::1]:9190" -> "::1"); None if it is malformed (a port that is no number,
    an unclosed bracket)."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, port = header[1:].partition("]")
        if not bracket or (port and not (port.startswith(":") and port[1:].isdigit())):
            return None
        return name
    if header.count(":") > 1:  # an IPv6 literal without brackets (no port can follow)
        return header
    name, colon, port = header.partition(":")
    if colon and not port.isdigit():
        return None
    return name


class _AllowedHosts:
    """Refuses (400) a request whose Host header names none of `hosts`: a page elsewhere
    cannot then read the dashboard through DNS rebinding (its requests name its own host).

    Starlette's TrustedHostMiddleware does not fit: it takes the host as
    `header.split(":")[0]`, so an IPv6 literal ("[::1]:9190", as a browser sends it for
    `--address ::1`) becomes "[" and matches nothing: every request would get 400. Here the
    brackets are understood (`host_name`); a `*.domain` entry (a certificate's wildcard name)
    allows its subdomains."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str]) -> None:
        self.app = app
        names = {host_name(host) for host in hosts if host}
        self.exact = {name for name in names if name and not name.startswith("*.")}
        self.suffixes = tuple(name[1:] for name in names if name and name.startswith("*."))

    def allows(self, header: str) -> bool:
        name = host_name(header)
        if not name:
            return False
        return name in self.exact or (bool(self.suffixes) and name.endswith(self.suffixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        header = next(
            (value.decode("latin-1") for key, value in scope["headers"] if key == b"host"), ""
        )
        if self.allows(header):
            await self.app(scope, receive, send)
            return
        await PlainTextResponse("Invalid host header", status_code=400)(scope, receive, send)


class _SecurityHeaders:
    """Adds the page's security headers (see the module docstring) to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(
    reader: StateReader, *, hosts: Iterable[str] = (), poll_seconds: float = POLL_SECONDS
) -> Starlette:
    """The dashboard over `reader`'s state directory; `hosts`: names it may be reached by
    besides 127.0.0.1 and localhost (the Host header of every request must be one)."""
    lock = threading.Lock()  # one snapshot at a time: the reader's caches are shared

    def snapshot() -> Snapshot:
        with lock:
            return reader.snapshot()

    def page(request: Request) -> Response:
        return HTMLResponse(render_page(snapshot(), poll_seconds=poll_seconds))

    def state(request: Request) -> Response:
        return Response(snapshot().model_dump_json(), media_type="application/json")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        reader.close()

    allowed = [*LOCAL_HOSTS, *(host for host in hosts if host)]
    return Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/api/state", state, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[
            Middleware(_SecurityHeaders),
            Middleware(_AllowedHosts, hosts=allowed),
        ],
        lifespan=lifespan,
    )


# -- the page ----------------------------------------------------------------------------------


def _e(value: object) -> str:
    """Any value as HTML text: escaped, quotes included (it may land in an attribute)."""
    return html.escape("" if value is None else str(value), quote=True)


def _number(value: float | str | None, digits: int) -> str:
    if value is None:
        return "\N{EN DASH}"
    if isinstance(value, str):
        return value  # "unbounded"
    return f"{value:.{digits}f}"


def _delta(value: float) -> str:
    """A delta as Python's `g` writes it (1e-05); static/dashboard.js writes it the same."""
    return f"{value:g}"


def _with_delta(epsilon: float | str | None, delta: float | None) -> str:
    """An epsilon beside its delta ("2.345 (δ = 1e-05)"); only the dash without either."""
    text = _number(epsilon, 3)
    return text if epsilon is None or delta is None else f"{text} (δ = {_delta(delta)})"


def _heading(text: str, delta: float | None) -> str:
    """A column heading naming the delta its epsilons are at."""
    return text if delta is None else f"{text} (δ = {_delta(delta)})"


def privacy_summary(run: RunView) -> str:
    """The run's DP in one line, each epsilon with its delta (static/dashboard.js writes the
    same text)."""
    parts = []
    if run.dp and run.delta is not None:
        parts.append(f"sample-level DP, δ = {_delta(run.delta)}")
    elif run.dp is False:
        parts.append("no sample-level DP")
    if run.central_delta is not None:
        epsilon = run.institution_level_epsilon
        if epsilon == UNBOUNDED:
            shown = "ε unbounded (no finite guarantee), "
        elif epsilon is not None:
            shown = f"ε = {_number(epsilon, 3)}, "
        else:
            shown = ""
        parts.append(f"institution-level DP, {shown}δ = {_delta(run.central_delta)}")
    return "; ".join(parts)


def _table(
    attributes: str, headings: Sequence[str], rows: Iterable[Sequence[object]], empty: str
) -> str:
    head = "".join(f"<th>{_e(heading)}</th>" for heading in headings)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr class="empty"><td colspan="{len(headings)}">{_e(empty)}</td></tr>'
    return f"<table {attributes}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


INSTITUTION_COLUMNS = ("name", "node id", "status", "registered (UTC)", "revoked (UTC)")


def round_columns(run: RunView) -> tuple[str, ...]:
    return (
        "round",
        "accuracy",
        "loss",
        _heading("ε max", run.delta),
        _heading("central ε", run.central_delta),
        "trained",
        "seconds",
        "note",
    )


def spend_columns(run: RunView) -> tuple[str, ...]:
    # Each ledger has its own delta: it stands beside its epsilon.
    return (
        "institution",
        "ε (this run)" if run.delta is None else f"ε (this run, δ = {_delta(run.delta)})",
        "rounds trained",
        "ε (ledger, every job)",
    )


REFUSAL_COLUMNS = ("round", "institution", "phase", "refused by", "reason")
AUDIT_COLUMNS = ("seq", "time (UTC)", "actor", "action", "details")


def _institutions(rows: list[InstitutionView]) -> str:
    return _table(
        'id="institutions"',
        INSTITUTION_COLUMNS,
        (
            (row.name, row.node_id, row.status, row.registered_at, row.revoked_at or "")
            for row in rows
        ),
        "no institution has enrolled yet",
    )


def _run(run: RunView) -> str:
    title = f"run {run.run}: {run.job}"
    progress = (
        f"{len(run.rounds)} of {run.rounds_planned} rounds"
        if run.rounds_planned
        else f"{len(run.rounds)} rounds"
    )
    privacy = privacy_summary(run)
    rounds = _table(
        'class="rounds"',
        round_columns(run),
        (
            (
                r.round,
                _number(r.accuracy, 4),
                _number(r.loss, 4),
                _number(r.epsilon_max, 3),
                _number(r.central_epsilon, 3),
                r.institutions_trained,
                _number(r.seconds, 2),
                r.note or "",
            )
            for r in run.rounds
        ),
        "no round recorded yet",
    )
    spend = _table(
        'class="spend"',
        spend_columns(run),
        (
            (
                s.institution,
                _number(s.epsilon, 3),
                s.rounds_trained,
                _with_delta(s.dataset_epsilon, s.dataset_delta),
            )
            for s in run.institutions
        ),
        "no institution has trained yet",
    )
    refusals = _table(
        'class="refusals"',
        REFUSAL_COLUMNS,
        ((r.round, r.institution, r.phase, r.refused_by, r.reason) for r in run.refusals),
        "no refusals",
    )
    return (
        f'<article class="run" data-run="{_e(run.run)}" data-status="{_e(run.status)}">'
        f'<h3><span class="title">{_e(title)}</span> '
        f'<span class="status status-{_e(run.status)}">{_e(run.status)}</span></h3>'
        f'<p class="summary">{_e(progress)}'
        f"{_e(' · ' + privacy) if privacy else ''}"
        f"{_e(' · updated ' + run.updated) if run.updated else ''}</p>"
        f'<p class="detail">{_e(run.detail or "")}</p>'
        '<div class="charts"><div class="chart" data-chart="metrics"></div>'
        '<div class="chart" data-chart="epsilon"></div></div>'
        f"<h4>Rounds</h4>{rounds}<h4>Institutions' spend</h4>{spend}"
        f"<h4>Refusals</h4>{refusals}</article>"
    )


def _audit(audit: AuditView) -> str:
    if audit.intact is True:
        verdict = f"chain verifies: {audit.total} entries"
    elif audit.intact is False:
        verdict = f"NOT intact ({audit.total} entries): " + "; ".join(audit.problems)
    else:
        verdict = f"{audit.total} entries; " + ("; ".join(audit.problems) or "not checked")
    table = _table(
        'id="audit"',
        AUDIT_COLUMNS,
        (
            (
                entry.seq,
                entry.at,
                entry.actor,
                entry.action,
                ", ".join(f"{key}={value}" for key, value in entry.details.items()),
            )
            for entry in audit.entries
        ),
        "the audit log is empty",
    )
    state = "intact" if audit.intact else ("damaged" if audit.intact is False else "unchecked")
    return f'<p id="audit-status" data-intact="{state}">{_e(verdict)}</p>{table}'


def render_page(snapshot: Snapshot, *, poll_seconds: float = POLL_SECONDS) -> str:
    """The whole page for `snapshot`: complete without its script, which then keeps it live."""
    problems = "".join(f"<li>{_e(problem)}</li>" for problem in snapshot.problems)
    runs = "".join(_run(run) for run in snapshot.runs) or (
        '<p class="empty">no run yet: `confide-server submit JOB --dir STATE` starts one</p>'
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>confide coordinator: {_e(snapshot.state)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/uPlot.min.css">
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/uPlot.iife.min.js" defer></script>
<script src="/static/dashboard.js" defer></script>
</head>
<body data-poll-seconds="{_e(poll_seconds)}">
<header>
<h1>confide coordinator</h1>
<p>state <code id="state-dir">{_e(snapshot.state)}</code> · read <span id="taken-at">{
        _e(snapshot.taken_at)
    }</span> · <span id="live" data-live="no">static (script not running)</span></p>
</header>
<ul id="problems">{problems}</ul>
<section><h2>Institutions</h2>{_institutions(snapshot.institutions)}</section>
<section><h2>Runs</h2><div id="runs">{runs}</div></section>
<section><h2>Audit log (newest first)</h2><div id="audit-log">{_audit(snapshot.audit)}</div>
</section>
</body>
</html>
"""
