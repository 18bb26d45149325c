"""The audit log's rows in the coordinator's database (`audit_log`, `confide.server.state`).

Its errors pass through as SQLAlchemy raised them: `AuditLog` turns them into
`AuditUnavailable`, except a second entry in one place, which says the log was changed.
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from confide.common.errors import AuditError
from confide.server._audit_format import RECOVERY
from confide.server.state import AuditRow


class AuditStore:
    """The rows of the audit log in `engine`'s database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def insert(self, row: AuditRow) -> None:
        """Insert `row`; the unique sequence number refuses a second entry in its place."""
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                session.add(row)
        except IntegrityError as error:
            raise AuditError(
                f"audit entry {row.seq} already exists: the log was changed behind its head "
                f"mark ({RECOVERY})"
            ) from error

    def last_row(self) -> AuditRow | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.scalars(select(AuditRow).order_by(AuditRow.seq.desc()).limit(1)).first()

    def rows(self, *, actions: Collection[str] | None = None) -> list[AuditRow]:
        """Every row, or those of `actions`, in sequence order."""
        query = select(AuditRow).order_by(AuditRow.seq)
        if actions is not None:
            query = query.where(AuditRow.action.in_(list(actions)))
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(query).all())

    def newest_rows(self, limit: int) -> list[AuditRow]:
        """The newest `limit` rows, newest first (the sequence number's index: the cost does
        not grow with the log)."""
        with Session(self.engine, expire_on_commit=False) as session:
            return list(
                session.scalars(select(AuditRow).order_by(AuditRow.seq.desc()).limit(limit)).all()
            )

    def count(self) -> int:
        with Session(self.engine) as session:
            return int(session.scalar(select(func.count()).select_from(AuditRow)) or 0)

    def rows_after(self, seq: int) -> list[AuditRow]:
        """The rows after entry `seq`, in sequence order."""
        with Session(self.engine) as session:
            return list(
                session.scalars(
                    select(AuditRow).where(AuditRow.seq > seq).order_by(AuditRow.seq)
                ).all()
            )
