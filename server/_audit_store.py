"""The audit log's rows in the coordinator's database (`audit_log`, `confide.server.state`).

Its errors pass through as SQLAlchemy raised them: `AuditLog` turns them into
`AuditUnavailable`, except a second entry in one place, which says the log was changed.
"""

from __future__ import annotations

from sqlalchemy import Engine, select
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

    def rows(self) -> list[AuditRow]:
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(select(AuditRow).order_by(AuditRow.seq)).all())

    def rows_after(self, seq: int) -> list[AuditRow]:
        """The rows after entry `seq`, in sequence order."""
        with Session(self.engine) as session:
            return list(
                session.scalars(
                    select(AuditRow).where(AuditRow.seq > seq).order_by(AuditRow.seq)
                ).all()
            )
