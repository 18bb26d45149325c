"""Join tokens: single-use, expiring invitations for one institution.

A token reads `confide1.<id>.<secret>.<ca-sha256>`. The coordinator stores only the SHA-256
of the secret; the CA fingerprint lets the institution check, before it trusts anything, that
it reached the coordinator that issued the token (no blind trust on first use).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from confide.server.state import JoinTokenRow

PREFIX = "confide1"
_INSTITUTION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_TOKEN = re.compile(r"^confide1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})\.([0-9a-f]{64})$")


class TokenError(ValueError):
    """A token that is malformed, unknown, expired or already used."""


@dataclass(frozen=True)
class JoinToken:
    token_id: str
    secret: str
    ca_fingerprint: str

    def __str__(self) -> str:
        return f"{PREFIX}.{self.token_id}.{self.secret}.{self.ca_fingerprint}"

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        match = _TOKEN.match(text.strip())
        if not match:
            raise TokenError(
                "malformed join token: expected confide1.<16 hex>.<43 base64url>.<64 hex>, "
                "as printed by `confide-server token create`"
            )
        return cls(*match.groups())


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
    engine: Engine, institution: str, ttl: datetime.timedelta, ca_fingerprint: str
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
        claimed = session.execute(
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
