"""Enrolled institutions: the coordinator's record, and revocation.

Revoking unregisters the institution's key from the SuperLink: a connected SuperNode is cut
off and the old key cannot come back. The record stays, marked revoked, for the audit trail.
Rotating replaces an enrolled institution's key with a new one under the same name (the
enrollment service checks the institution's proof of possession of its current key first).
"""

from __future__ import annotations

import datetime
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from confide.server.state import InstitutionRow


class InstitutionError(ValueError):
    """An unknown or already revoked institution."""


class NodeRegistry(Protocol):
    def unregister(self, node_id: int) -> None: ...
    def statuses(self) -> dict[int, str]: ...


class KeyRegistry(Protocol):
    def register(self, public_key_openssh: bytes, institution: str) -> int:
        """Register the key with the SuperLink under `institution`; return the node id."""
        ...

    def unregister(self, node_id: int) -> None:
        """Unregister the node from the SuperLink (a connected SuperNode is cut off)."""
        ...


@dataclass(frozen=True)
class Institution:
    name: str
    node_id: int
    registered_at: datetime.datetime
    revoked_at: datetime.datetime | None
    status: str


def enrolled(engine: Engine, name: str) -> bool:
    """True if `name` holds a key that has not been revoked."""
    with Session(engine) as session:
        row = session.get(InstitutionRow, name)
        return row is not None and row.revoked_at is None


def enrolled_key(engine: Engine, name: str) -> tuple[bytes, int] | None:
    """The public key and node id `name` is enrolled with, None if unknown or revoked."""
    with Session(engine) as session:
        row = session.get(InstitutionRow, name)
        if row is None or row.revoked_at is not None:
            return None
        return row.public_key, int(row.node_id)


def rotate_key(engine: Engine, registry: KeyRegistry, name: str, old: bytes, new: bytes) -> int:
    """Replace `name`'s key `old` with `new`; return the new node id.

    The new key is registered first and the old node unregistered next (the new one is
    unregistered again if that fails), so the SuperLink never holds neither key nor, once this
    returns, both; the record changes last, in the same transaction that found `old` current.
    """
    with Session(engine) as session, session.begin():
        row = session.get(InstitutionRow, name)
        if row is None or row.revoked_at is not None or row.public_key != old:
            raise InstitutionError(f"{name} is not enrolled with that key")
        node_id = registry.register(new, name)
        try:
            registry.unregister(int(row.node_id))
        except BaseException:
            with suppress(RuntimeError):  # best effort: the caller reports the first failure
                registry.unregister(node_id)
            raise
        row.node_id, row.public_key = str(node_id), new
        return node_id


def record_enrollment(engine: Engine, name: str, node_id: int, public_key: bytes) -> None:
    now = datetime.datetime.now(datetime.UTC)
    with Session(engine) as session, session.begin():
        row = session.get(InstitutionRow, name)
        if row is None:
            session.add(
                InstitutionRow(
                    name=name,
                    node_id=str(node_id),
                    public_key=public_key,
                    registered_at=now,
                    revoked_at=None,
                )
            )
        else:  # re-enrolled after a revocation, with a new key
            row.node_id, row.public_key = str(node_id), public_key
            row.registered_at, row.revoked_at = now, None


def list_institutions(engine: Engine, registry: NodeRegistry | None) -> list[Institution]:
    """Every enrolled institution with its live status (`unknown` without the SuperLink)."""
    statuses = registry.statuses() if registry is not None else {}
    with Session(engine) as session:
        rows = session.scalars(select(InstitutionRow).order_by(InstitutionRow.name)).all()
        return [
            Institution(
                row.name,
                int(row.node_id),
                row.registered_at,
                row.revoked_at,
                "revoked" if row.revoked_at else statuses.get(int(row.node_id), "unknown"),
            )
            for row in rows
        ]


def revoke(engine: Engine, registry: NodeRegistry, name: str) -> int:
    """Unregister the institution's key from the SuperLink and mark it revoked."""
    with Session(engine) as session, session.begin():
        row = session.get(InstitutionRow, name)
        if row is None:
            raise InstitutionError(f"no institution named {name!r}")
        if row.revoked_at is not None:
            raise InstitutionError(f"{name} was already revoked on {row.revoked_at:%Y-%m-%d}")
        registry.unregister(int(row.node_id))
        row.revoked_at = datetime.datetime.now(datetime.UTC)
        return int(row.node_id)
