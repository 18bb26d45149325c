"""Enrolled institutions: the coordinator's record, and revocation.

Revoking unregisters the institution's key from the SuperLink: a connected SuperNode is cut
off and the old key cannot come back. The record stays, marked revoked, for the audit trail.
Rotating replaces an enrolled institution's key with a new one under the same name (the
enrollment service checks the institution's proof of possession of its current key first), in
steps each committed before the next (`rotate_key`): a rotation cut short anywhere — a failed
commit, a coordinator that died — is finished by the next request for the same new key.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from confide.common.errors import RotationRefused, RotationUnfinished, UnknownInstitution
from confide.server.state import InstitutionRow, KeyRotationRow

_log = logging.getLogger(__name__)
# What an institution that confide's client runs does to start over with a new key.
_START_OVER = (
    "rotate again with a new key (confide-client: delete institution.key.next and "
    "institution.pub.next, then run rotate-key)"
)


class NodeRegistry(Protocol):
    def unregister(self, node_id: int) -> None: ...
    def statuses(self) -> dict[int, str]: ...


class KeyRegistry(NodeRegistry, Protocol):
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


def pending_key(engine: Engine, name: str) -> bytes | None:
    """The new key a rotation under way is moving `name` to; None if none is."""
    with Session(engine) as session:
        pending = session.get(KeyRotationRow, name)
        return None if pending is None else pending.public_key


def rotate_key(engine: Engine, registry: KeyRegistry, name: str, *, old: bytes, new: bytes) -> int:
    """Replace `name`'s key `old` with `new`, or finish a rotation to `new` that was cut
    short; return the new node id.

    Each step is committed (or done at the SuperLink) before the next begins, so whatever
    point a rotation stops at, the next request for `new` carries on from there:

    1. record the rotation to `new` (one to another key is abandoned, its node unregistered);
    2. register `new` with the SuperLink and record its node id;
    3. unregister the old node (one the SuperLink no longer holds counts as done);
    4. make `new` the institution's key and drop the record of the rotation.

    The old key connects until step 3, the new one from step 2. The SuperLink never takes a
    key twice (Flower keeps public keys unique, unregistered nodes included): that is why the
    new key's node id is recorded before anything else changes.
    """
    old_node, node_id, earlier = _start(engine, registry, name, old, new)
    if node_id is None:
        node_id = _register(engine, registry, name, new, earlier=earlier)
    try:
        _unregister(registry, old_node)
    except RuntimeError as error:
        raise RotationUnfinished(
            f"the SuperLink registered the new key as node {node_id} but did not unregister "
            f"the old node {old_node} ({error}); both keys connect for now. Run rotate-key "
            "again to finish."
        ) from None
    _finish(engine, name, new, node_id, old_node)
    return node_id


def _start(
    engine: Engine, registry: KeyRegistry, name: str, old: bytes, new: bytes
) -> tuple[int, int | None, bool]:
    """Step 1: (the old node, the new key's node if already registered, whether an earlier
    request recorded this rotation)."""
    try:
        with Session(engine) as session, session.begin():
            row = session.get(InstitutionRow, name)
            if row is None or row.revoked_at is not None or row.public_key != old:
                raise UnknownInstitution(f"{name} is not enrolled with that key")
            pending = session.get(KeyRotationRow, name)
            if pending is not None and pending.public_key == new:
                node = None if pending.node_id is None else int(pending.node_id)
                if node is None or not _gone(registry, node):
                    return int(row.node_id), node, True
                # Its node was unregistered meanwhile (a revocation that failed halfway, an
                # operator): this rotation cannot finish. Forgotten here, committed on exit.
                session.delete(pending)
            else:
                if pending is not None:
                    _abandon(registry, pending)
                    session.delete(pending)
                    session.flush()
                now = datetime.datetime.now(datetime.UTC)
                session.add(KeyRotationRow(name=name, public_key=new, node_id=None, started_at=now))
                return int(row.node_id), None, False
    except SQLAlchemyError as error:
        raise RotationRefused(
            f"the coordinator could not record the rotation ({error}); nothing changed"
        ) from None
    raise RotationRefused(
        f"the new key's node {node} was unregistered before the rotation finished (a "
        "revocation, or the coordinator's operator); the SuperLink never takes that key "
        f"again. The current key stays in use: {_START_OVER}"
    )


def _gone(registry: NodeRegistry, node: int) -> bool:
    """The SuperLink lists `node` as unregistered (an unknown status is not taken as gone)."""
    try:
        return registry.statuses().get(node) == "unregistered"
    except RuntimeError:
        return False


def _abandon(registry: NodeRegistry, pending: KeyRotationRow) -> None:
    """Unregister the node of a rotation to another key that did not finish (the
    institution started over with a new key)."""
    if pending.node_id is None:
        _log.warning(
            "a rotation of %s started %s was abandoned before its node id was recorded: if the "
            "SuperLink registered that key, unregister its node (flwr supernode list)",
            pending.name,
            pending.started_at,
        )
        return
    try:
        _unregister(registry, int(pending.node_id))
    except RuntimeError as error:
        raise RotationRefused(
            f"an unfinished rotation of {pending.name} to another key registered node "
            f"{pending.node_id}, which the SuperLink did not unregister ({error}); nothing "
            "changed: try again"
        ) from None


def _register(
    engine: Engine, registry: KeyRegistry, name: str, new: bytes, *, earlier: bool
) -> int:
    """Step 2: register `new` and record its node id (`earlier`: an earlier request for this
    key got past step 1, and may have registered it without recording the node id)."""
    try:
        node_id = registry.register(new, name)
    except RuntimeError as error:
        if earlier:
            raise RotationRefused(
                f"the SuperLink refused the new key ({error}). An earlier request for it was "
                "cut short and may have registered it without recording its node id; if the "
                "SuperLink says the key is already in use, that key cannot be used. The "
                f"current key stays in use: {_START_OVER}"
            ) from None
        _forget(engine, name)
        raise RotationRefused(f"SuperLink refused: {error}; nothing changed") from None
    try:
        with Session(engine) as session, session.begin():
            pending = session.get(KeyRotationRow, name)
            if pending is None:  # revoked meanwhile
                raise SQLAlchemyError(f"the rotation of {name} is no longer under way")
            pending.node_id = str(node_id)
    except SQLAlchemyError as error:
        raise _unrecorded(registry, node_id, error) from None
    return node_id


def _forget(engine: Engine, name: str) -> None:
    """Drop the record of a rotation whose key the SuperLink refused (best effort: a record
    left behind only makes the next request for that key register it again)."""
    try:
        with Session(engine) as session, session.begin():
            if (pending := session.get(KeyRotationRow, name)) is not None:
                session.delete(pending)
    except SQLAlchemyError:
        pass


def _unrecorded(registry: KeyRegistry, node_id: int, error: Exception) -> RotationRefused:
    """The new key's node id could not be recorded: unregister the node again, so that the
    SuperLink holds no node the coordinator does not know of. The key is spent either way
    (the SuperLink never takes it twice)."""
    try:
        registry.unregister(node_id)
    except RuntimeError as cleanup:
        return RotationRefused(
            f"the SuperLink registered the new key as node {node_id}, but the coordinator "
            f"could neither record it ({error}) nor unregister it ({cleanup}): its operator "
            f"must unregister node {node_id} (flwr supernode unregister). The current key "
            f"stays in use: {_START_OVER}"
        )
    return RotationRefused(
        f"the SuperLink registered the new key as node {node_id}, but the coordinator could "
        f"not record it ({error}), so node {node_id} was unregistered again. The current key "
        f"stays in use and the new one cannot be registered again: {_START_OVER}"
    )


def _unregister(registry: NodeRegistry, node_id: int) -> None:
    """Unregister `node_id`; a node the SuperLink no longer holds registered counts as done
    (an earlier request unregistered it and was cut short after)."""
    try:
        registry.unregister(node_id)
    except RuntimeError:
        try:
            status = registry.statuses().get(node_id, "unregistered")
        except RuntimeError:
            status = None
        if status != "unregistered":
            raise


def _finish(engine: Engine, name: str, new: bytes, node_id: int, old_node: int) -> None:
    """Step 4: the new key becomes the institution's."""
    try:
        with Session(engine) as session, session.begin():
            row, pending = session.get(InstitutionRow, name), session.get(KeyRotationRow, name)
            if row is None or pending is None:
                raise SQLAlchemyError(f"the record of {name} or of its rotation is gone")
            row.node_id, row.public_key = str(node_id), new
            session.delete(pending)
    except SQLAlchemyError as error:
        raise RotationUnfinished(
            f"the SuperLink holds the new key as node {node_id} and unregistered the old node "
            f"{old_node}, but the coordinator could not record it ({error}): the old key no "
            "longer connects. Run rotate-key again to finish (either key signs the request)."
        ) from None


def record_enrollment(engine: Engine, *, name: str, node_id: int, public_key: bytes) -> None:
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
    """Unregister the institution's key from the SuperLink — and the new key of a rotation
    under way — and mark it revoked."""
    with Session(engine) as session, session.begin():
        row = session.get(InstitutionRow, name)
        if row is None:
            raise UnknownInstitution(f"no institution named {name!r}")
        if row.revoked_at is not None:
            raise UnknownInstitution(f"{name} was already revoked on {row.revoked_at:%Y-%m-%d}")
        if (pending := session.get(KeyRotationRow, name)) is not None:
            _abandon(registry, pending)
            session.delete(pending)
        _unregister(registry, int(row.node_id))
        row.revoked_at = datetime.datetime.now(datetime.UTC)
        return int(row.node_id)


def enrolled_nodes(engine: Engine) -> dict[int, str]:
    """Node id -> name of every institution enrolled and not revoked: the only nodes a job
    samples, named from the key each registered at enrollment (never from what a node says)."""
    with Session(engine) as session:
        rows = session.scalars(select(InstitutionRow).where(InstitutionRow.revoked_at.is_(None)))
        return {int(row.node_id): row.name for row in rows}
