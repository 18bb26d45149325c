"""The coordinator's audit log: who did what, append-only, and evidence when it was changed.

Entries live in the coordinator's database (`audit_log`, `confide.server.state`), so they are
kept and backed up with everything else there. Each entry carries an HMAC-SHA256 over its
sequence number, time, actor, action, canonical JSON details and the MAC of the entry before
it, under a key kept beside the state (`STATE/audit.key`, mode 0600): someone who can change
the database but not read the state folder cannot edit, delete, reorder or insert an entry
without `verify` noticing. A chain alone does not show that its newest entries were cut off,
so the MAC of the newest entry is also kept in a head mark (`STATE/audit.head`, MAC'd itself
and replaced atomically): the log must reach the entry the head names.

Writers are several processes on the coordinator's host (the coordinator, the CLI, the
ServerApp); an exclusive `fcntl` lock on `STATE/audit.lock` makes each append (read the head,
insert, move the head) one step, and the unique sequence number refuses a second entry in the
same place even without it. A reader that only verifies (the dashboard: `verify(shared=True)`)
takes the lock shared, on a read-only descriptor: it writes nothing, readers do not wait for
one another, and an append waits only while the rows are read. An append chains on the head
mark, not on the newest row, so entries deleted from the end stay missing (a gap `verify`
reports) instead of being papered over by the next entry. An append refuses (`AuditError`)
to extend a log whose key or head mark is gone or forged: the log never grows past damage it
cannot carry forward.

Details are values only (text, numbers, booleans, None). Callers never put secrets in them
(join tokens, keys): an entry names a token by its id and a key by its fingerprint.

Errors: every failure of `append`, `entries`, `verify` and `reseal` is an `AuditError` naming
what and where — damage, and also (`AuditUnavailable`, the cause chained) a file that cannot
be opened (a root-owned `audit.lock` left by `sudo confide-server ...`) or a database that
refuses (locked, read-only) — so callers handle one exception: the coordinator's start and
`token create` refuse, services that must keep running log a warning.

Recovery: a log `append` refuses stays refused until an operator accepts it as it stands:
`confide-server audit reseal --dir STATE --reason TEXT` (`AuditLog.reseal`) moves the key
aside (`audit.key.replaced-TIME`, for later inspection), makes a new one and appends an
`audit.resealed` entry chained on nothing, which records the reason, the operator and the
problems found; the head mark then names it. Entries before it are kept as they were and no
longer checked: `verify` checks the newest segment, from the newest reseal entry that matches
the key. A reseal cut short leaves a log `append` still refuses: run it again.

Actions (the names other code and `confide-server audit` rely on): `service.started`,
`service.stopped`, `token.created`, `token.redeemed`, `token.refused`,
`institution.registered`, `institution.revoked`, `institution.key-rotated`, `job.submitted`,
`run.finished`, `run.failed`, `run.stopped`, `round.refused`, `audit.resealed`.

Code: this module is the public face (`AuditLog`, `AuditEntry`). Each part of the work is a
private module beside it, readable on its own: the entries as the MACs cover them
(`_audit_format`), the key, head mark and lock files (`_audit_files`), the rows in the
database (`_audit_store`), where an append chains on (`_audit_tail`) and the checks `verify`
makes (`_audit_verify`).
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Collection, Iterator
from contextlib import contextmanager

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from confide.common.errors import AuditError, AuditUnavailable
from confide.server import _audit_verify
from confide.server._audit_files import AuditFiles
from confide.server._audit_format import RESEALED, Detail, entry_mac, new_row
from confide.server._audit_format import canonical_json as canonical_json  # public here
from confide.server._audit_store import AuditStore
from confide.server._audit_tail import AuditTail
from confide.server.settings import ServerSettings, StateDir
from confide.server.state import AuditRow, open_database

# Defined with the format it belongs to; this module's, where it has always been.
canonical_json.__module__ = __name__
_PROBLEMS_RECORDED = 10  # in a reseal entry; the rest are counted


class AuditEntry(BaseModel):
    """One entry, as stored: `at` is UTC ISO 8601, `details` what the action concerned."""

    model_config = ConfigDict(frozen=True)

    seq: int
    at: str
    actor: str
    action: str
    details: dict[str, Detail]
    mac: str


def operator_actor() -> str:
    """The actor of an operator's command: the local user who ran it."""
    try:
        return f"operator:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"operator:uid-{os.getuid()}"


class AuditLog:
    """The audit log of one coordinator state folder (see the module docstring).

    A facade: its files, its rows, where an append chains on and the checks are each done by
    a collaborator (see the module docstring), built from `directory` and `engine` on each
    use, so that they always name this log's.
    """

    def __init__(self, directory: StateDir, engine: Engine) -> None:
        self.directory = directory
        self.engine = engine

    @classmethod
    def open(cls, directory: StateDir, settings: ServerSettings | None = None) -> AuditLog:
        """The log of `directory` (its settings are read when not given); `AuditError` if
        its database cannot be opened."""
        settings = settings if settings is not None else directory.load_settings()
        url = directory.database_url(settings)
        try:
            return cls(directory, open_database(url))
        except SQLAlchemyError as error:
            cause = getattr(error, "orig", None) or error
            raise AuditUnavailable(f"the audit log's database cannot be opened: {cause}") from error

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def _files(self) -> AuditFiles:
        return AuditFiles(self.directory)

    @property
    def _store(self) -> AuditStore:
        return AuditStore(self.engine)

    def append(self, action: str, *, actor: str, **details: Detail) -> AuditEntry:
        """Record `action` by `actor`; return the entry. Raises `AuditError` when the log is
        damaged (key or head mark missing or forged) or cannot be written."""
        for name, value in details.items():
            if not isinstance(value, Detail):
                raise TypeError(f"audit detail {name}={value!r}: use text, numbers or None")
        files, store = self._files, self._store
        with self._failures("written"), files.locked():
            tail = AuditTail(files, store)
            key = tail.key()
            seq, previous = tail.position(key)
            row = new_row(seq + 1, action=action, actor=actor, details=details)
            row.mac = entry_mac(key, row, previous)
            store.insert(row)
            files.write_head(key, row.seq, row.mac)
        return self._entry(row)

    def entries(self, *, actions: Collection[str] | None = None) -> list[AuditEntry]:
        """Every entry, or those of `actions`, in sequence order."""
        with self._failures("read"):
            return [self._entry(row) for row in self._store.rows(actions=actions)]

    def newest(self, limit: int) -> list[AuditEntry]:
        """The newest `limit` entries, newest first: a reader that shows the log's end (the
        dashboard) reads that much, however long the log grew."""
        with self._failures("read"):
            return [self._entry(row) for row in self._store.newest_rows(limit)]

    def count(self) -> int:
        """How many entries the log holds."""
        with self._failures("read"):
            return self._store.count()

    def verify(self, *, shared: bool = False) -> list[str]:
        """What is wrong with the log's newest segment (see the module docstring), one line
        each; [] when it is intact.

        `shared`: a reader's check (the dashboard), which writes nothing: the lock is taken
        shared on a read-only descriptor of the existing lock file (`AuditFiles.shared`), so
        readers do not wait for one another and an append waits only while the rows are read;
        a missing lock file is `AuditUnavailable`. Otherwise the writers' exclusive lock
        (created if missing)."""
        files = self._files
        with self._failures("read"):
            with files.shared() if shared else files.locked():
                rows = self._store.rows()
                key = files.read_key()
                head_text = files.read_head_text()
            return _audit_verify.problems(files, key=key, rows=rows, head=head_text)

    def reseal(self, reason: str, *, actor: str) -> tuple[AuditEntry, list[str]]:
        """Accept a damaged log as it stands and start a new segment (see the module
        docstring); (the `audit.resealed` entry, the problems it accepted). Refused
        (`AuditError`) without a reason or for an intact log."""
        if not reason.strip():
            raise AuditError("a reseal needs a reason (it is recorded in the audit log)")
        try:
            problems = self.verify()
        except AuditUnavailable:
            raise  # not damage: nothing to accept
        except AuditError as error:  # a key file that is no key
            problems = [str(error)]
        if not problems:
            raise AuditError("the audit log is intact: there is nothing to reseal")
        files, store = self._files, self._store
        with self._failures("resealed"), files.locked():
            last = store.last_row()
            before = last.seq if last is not None else 0
            shown = problems[:_PROBLEMS_RECORDED]
            hidden = len(problems) - len(shown)
            details: dict[str, Detail] = {
                "reason": reason.strip(),
                "problems": "; ".join(shown) + (f"; and {hidden} more" if hidden else ""),
                "unchecked_entries": before,
            }
            key = files.replace_key()
            row = new_row(before + 1, action=RESEALED, actor=actor, details=details)
            row.mac = entry_mac(key, row, "")
            store.insert(row)
            files.write_head(key, row.seq, row.mac)
        return self._entry(row), problems

    @contextmanager
    def _failures(self, doing: str) -> Iterator[None]:
        """A file or database that refuses, as `AuditError` (the cause chained): callers
        then handle one exception, whatever broke."""
        try:
            yield
        except OSError as error:
            where = error.filename or self.directory.root
            raise AuditUnavailable(
                f"the audit log could not be {doing}: {where}: {error.strerror or error}"
            ) from error
        except SQLAlchemyError as error:
            url = self.engine.url.render_as_string(hide_password=True)
            cause = getattr(error, "orig", None) or error
            raise AuditUnavailable(
                f"the audit log could not be {doing}: the database {url}: {cause}"
            ) from error

    @staticmethod
    def _entry(row: AuditRow) -> AuditEntry:
        return AuditEntry(
            seq=row.seq,
            at=row.at,
            actor=row.actor,
            action=row.action,
            details=json.loads(row.details),
            mac=row.mac,
        )
