"""The coordinator's database: enrolled institutions, join tokens, the audit log and the
registered model versions (SQLAlchemy).

SQLite in the state directory by default; any SQLAlchemy URL (PostgreSQL) works. Secrets are
never stored: a join token is kept as the SHA-256 of its secret part.
"""

from __future__ import annotations

import datetime

from sqlalchemy import (
    DateTime,
    Engine,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
)
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class JoinTokenRow(Base):
    __tablename__ = "join_tokens"

    token_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    institution: Mapped[str] = mapped_column(String(64), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime.datetime | None] = mapped_column(DateTime(timezone=True))


class InstitutionRow(Base):
    """An enrolled institution: its name, the SuperLink's node id and its public key."""

    __tablename__ = "institutions"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Node ids are unsigned 64-bit; SQL integers are signed, so they are stored as text.
    node_id: Mapped[str] = mapped_column(String(20))
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    registered_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime.datetime | None] = mapped_column(DateTime(timezone=True))


class KeyRotationRow(Base):
    """A key rotation under way: the new key, and its node id once the SuperLink registered
    it. Committed before the SuperLink changes, so that a rotation cut short (a failed commit,
    a coordinator that died) is finished by the next request instead of locking the
    institution out (`confide.server.institutions.rotate_key`)."""

    __tablename__ = "key_rotations"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    node_id: Mapped[str | None] = mapped_column(String(20))
    started_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))


class AuditRow(Base):
    """One entry of the audit log (`confide.server.audit`): appended, never changed. The
    sequence number is assigned by the writer (unique: two writers cannot both take one); the
    time is kept as the ISO text the MAC covers, so no database can reformat it."""

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[str] = mapped_column(String(40))
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64), index=True)
    details: Mapped[str] = mapped_column(Text)  # canonical JSON
    mac: Mapped[str] = mapped_column(String(64))


class ModelVersionRow(Base):
    """A registered model version (`confide.server.model_registry`): immutable once written.
    The files are in the state directory (models/NAME/VERSION); the row keeps their hash and
    the card, so that a changed file is detected."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    run: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))
    card: Mapped[str] = mapped_column(Text)  # model.json as registered


# Enough for every table to have been created by someone: each failed attempt means another
# process created at least one table between this one's check and its CREATE.
_CREATE_ATTEMPTS = len(Base.metadata.tables) + 1


def open_database(url: str) -> Engine:
    """Connect and create missing tables (idempotent, and safe when several processes open a
    new database at once).

    `create_all` checks which tables exist and then creates the others; two processes doing
    that at once both see a table missing and one CREATE fails ("table ... already exists" in
    SQLite, a duplicate table or type in PostgreSQL). The check is simply made again: a table
    another process created is then seen and skipped.
    """
    engine = create_engine(url)
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            Base.metadata.create_all(engine)
            break
        except DatabaseError:
            if attempt == _CREATE_ATTEMPTS - 1:
                raise
    return engine
