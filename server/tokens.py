"""Join tokens: single-use, expiring invitations for one institution.

The token's format is shared with institutions (`confide.protos.join_token`); this module
issues and redeems them. The coordinator stores only the SHA-256 of a token's secret, and
limits how often one address may be refused (`RedemptionLimiter`).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import CursorResult, Engine, select, update
from sqlalchemy.orm import Session

from confide.protos.join_token import JoinToken, TokenError
from confide.server.state import JoinTokenRow

__all__ = [
    "JoinToken",
    "RedemptionLimiter",
    "TokenError",
    "create_token",
    "parse_ttl",
    "redeem_token",
    "release_token",
]

_INSTITUTION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def check_institution_name(name: str) -> str:
    if not _INSTITUTION.match(name):
        raise TokenError(
            f"institution name {name!r}: use 1-63 lowercase letters, digits and hyphens, "
            "starting with a letter or digit"
        )
    return name


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_token(
    engine: Engine, institution: str, *, ttl: datetime.timedelta, ca_fingerprint: str
) -> JoinToken:
    """Issue a token for `institution`, valid for `ttl`, and store its hash."""
    check_institution_name(institution)
    if ttl <= datetime.timedelta(0):
        raise TokenError("the token lifetime must be positive")
    token = JoinToken(secrets.token_hex(8), secrets.token_urlsafe(32), ca_fingerprint)
    now = _now()
    with Session(engine) as session, session.begin():
        session.add(
            JoinTokenRow(
                token_id=token.token_id,
                institution=institution,
                secret_sha256=_digest(token.secret),
                created_at=now,
                expires_at=now + ttl,
                used_at=None,
            )
        )
    return token


def redeem_token(engine: Engine, token: JoinToken) -> str:
    """Mark the token used and return its institution; refuse unknown, wrong, expired or used.

    The update is conditional on `used_at IS NULL`, so two concurrent redemptions cannot both
    succeed.
    """
    now = _now()
    with Session(engine) as session, session.begin():
        row = session.scalar(select(JoinTokenRow).where(JoinTokenRow.token_id == token.token_id))
        if row is None or not hmac.compare_digest(row.secret_sha256, _digest(token.secret)):
            raise TokenError("unknown join token")
        if row.used_at is not None:
            raise TokenError("this join token was already used; ask for a new one")
        expires = row.expires_at.replace(tzinfo=row.expires_at.tzinfo or datetime.UTC)
        if expires <= now:
            raise TokenError(f"this join token expired at {expires:%Y-%m-%d %H:%M} UTC")
        # An UPDATE's result is a CursorResult, which counts the rows it changed.
        claimed: CursorResult[Any] = session.execute(  # type: ignore[assignment]
            update(JoinTokenRow)
            .where(JoinTokenRow.token_id == token.token_id, JoinTokenRow.used_at.is_(None))
            .values(used_at=now)
        )
        if claimed.rowcount != 1:
            raise TokenError("this join token was already used; ask for a new one")
        return row.institution


def parse_ttl(text: str) -> datetime.timedelta:
    """`90m`, `24h`, `7d` (whole minutes, hours or days)."""
    match = re.fullmatch(r"(\d+)([mhd])", text.strip())
    if not match or int(match.group(1)) == 0:
        raise TokenError(f"--ttl {text!r}: use a positive number with m, h or d, e.g. 24h")
    unit = {"m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
    return datetime.timedelta(**{unit: int(match.group(1))})


def release_token(engine: Engine, token: JoinToken) -> None:
    """Make a redeemed token usable again: its registration failed after redemption."""
    with Session(engine) as session, session.begin():
        session.execute(
            update(JoinTokenRow).where(JoinTokenRow.token_id == token.token_id).values(used_at=None)
        )


class RedemptionLimiter:
    """A token bucket per peer address, for refused enrollment requests.

    An address may be refused `burst` (5) times; its allowance refills at `per_minute` (5) a
    minute, one every 12 s. While it is empty every request from that address — a join with
    a valid token included — is refused before anything is looked at (the enrollment service
    answers RESOURCE_EXHAUSTED with the wait), until one refusal has refilled. The service
    counts every refused join, whatever the reason, and every key rotation refused before its
    signature proved the caller (`confide.server.enrollment`); successful requests take
    nothing. So guessing a token (a 256-bit secret) gets at most about 7,200 tries a day from
    one address, each refusal the audit log records is bounded by the same rate, and an
    institution that mistyped its token waits 12 s per further try after its fifth.
    Addresses whose allowance is full again are forgotten, so the table only holds those
    refused in the last minute.
    """

    def __init__(
        self,
        burst: int = 5,
        per_minute: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.refill_seconds = 60.0 / per_minute
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # peer -> (allowance, at)
        self._lock = threading.Lock()

    def _allowance(self, peer: str, now: float) -> float:
        allowance, at = self._buckets.get(peer, (self.burst, now))
        return min(self.burst, allowance + (now - at) / self.refill_seconds)

    def retry_after(self, peer: str) -> float:
        """0 if `peer` may try now; else the seconds until it may."""
        with self._lock:
            allowance = self._allowance(peer, self.clock())
        return 0.0 if allowance >= 1 else (1 - allowance) * self.refill_seconds

    def failed(self, peer: str) -> bool:
        """Count a refusal of `peer`; True if it used up its allowance with this one."""
        with self._lock:
            now = self.clock()
            allowance = max(0.0, self._allowance(peer, now) - 1)
            self._buckets[peer] = (allowance, now)
            self._forget_full(now)
        return allowance < 1

    def _forget_full(self, now: float) -> None:
        full = [peer for peer in self._buckets if self._allowance(peer, now) >= self.burst]
        for peer in full:
            del self._buckets[peer]
