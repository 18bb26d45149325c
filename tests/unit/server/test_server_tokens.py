"""Join tokens: hashed at rest, single use, expiring, bound to the CA fingerprint."""

from __future__ import annotations

import datetime

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from confide.server.state import JoinTokenRow, open_database
from confide.server.tokens import (
    JoinToken,
    TokenError,
    create_token,
    parse_ttl,
    redeem_token,
)

FINGERPRINT = "ab" * 32
DAY = datetime.timedelta(days=1)


@pytest.fixture
def engine(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path}/state.db")
    yield engine
    engine.dispose()


def test_token_round_trips_through_its_text_form(engine):
    token = create_token(engine, "hospital-a", ttl=DAY, ca_fingerprint=FINGERPRINT)
    assert JoinToken.parse(str(token)) == token
    assert str(token).startswith("confide1.") and str(token).endswith(FINGERPRINT)


def test_only_a_hash_of_the_secret_is_stored(engine):
    token = create_token(engine, "hospital-a", ttl=DAY, ca_fingerprint=FINGERPRINT)
    with Session(engine) as session:
        row = session.scalar(select(JoinTokenRow))
    assert token.secret not in row.secret_sha256 and len(row.secret_sha256) == 64


def test_a_token_is_redeemed_once_for_its_institution(engine):
    token = create_token(engine, "hospital-a", ttl=DAY, ca_fingerprint=FINGERPRINT)
    assert redeem_token(engine, token) == "hospital-a"
    with pytest.raises(TokenError, match="already used"):
        redeem_token(engine, token)


def test_expired_token_is_refused(engine):
    token = create_token(
        engine, "hospital-a", ttl=datetime.timedelta(microseconds=1), ca_fingerprint=FINGERPRINT
    )
    with pytest.raises(TokenError, match="expired"):
        redeem_token(engine, token)


def test_wrong_secret_or_unknown_id_is_refused(engine):
    token = create_token(engine, "hospital-a", ttl=DAY, ca_fingerprint=FINGERPRINT)
    forged = JoinToken(token.token_id, "x" * 43, FINGERPRINT)
    with pytest.raises(TokenError, match="unknown"):
        redeem_token(engine, forged)
    with pytest.raises(TokenError, match="unknown"):
        redeem_token(engine, JoinToken("0" * 16, token.secret, FINGERPRINT))
    assert redeem_token(engine, token) == "hospital-a"  # the failed tries did not consume it


@pytest.mark.parametrize(
    "text",
    [
        "",
        "confide1.abc",
        "confide2." + "a" * 16 + "." + "b" * 43 + "." + "c" * 64,
        "confide1." + "a" * 16 + "." + "b" * 43 + "." + "g" * 64,
    ],
)
def test_malformed_token_text_is_refused_with_the_expected_shape(text):
    with pytest.raises(TokenError, match="malformed join token"):
        JoinToken.parse(text)


@pytest.mark.parametrize("name", ["Hospital A", "-a", "", "a" * 64, "ü"])
def test_bad_institution_names_are_refused(engine, name):
    with pytest.raises(TokenError, match="institution name"):
        create_token(engine, name, ttl=DAY, ca_fingerprint=FINGERPRINT)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("90m", datetime.timedelta(minutes=90)), ("24h", DAY), ("7d", 7 * DAY)],
)
def test_ttl_parses_minutes_hours_days(text, expected):
    assert parse_ttl(text) == expected


@pytest.mark.parametrize("text", ["0h", "24", "1w", "-1d", "h"])
def test_bad_ttl_is_refused(text):
    with pytest.raises(TokenError, match="--ttl"):
        parse_ttl(text)
