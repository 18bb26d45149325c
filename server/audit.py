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
same place even without it. An append chains on the head mark, not on the newest row, so
entries deleted from the end stay missing (a gap `verify` reports) instead of being papered
over by the next entry. An append refuses (`AuditError`) to extend a log whose key or head
mark is gone or forged: the log never grows past damage it cannot carry forward.

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
"""

from __future__ import annotations

import datetime
import fcntl
import getpass
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from confide.common.errors import AuditError, AuditUnavailable
from confide.common.files import write_atomic
from confide.server.settings import ServerSettings, StateDir
from confide.server.state import AuditRow, open_database

Detail = str | int | float | bool | None
RESEALED = "audit.resealed"
_ENTRY_TAG = "confide-audit-entry-v1"
_HEAD_TAG = "confide-audit-head-v1"
_RECOVERY = (
    "see `confide-server audit verify`; once the cause is understood, "
    "`confide-server audit reseal --dir STATE --reason TEXT` starts a new segment"
)
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


def canonical_json(value: Any) -> str:
    """The one text of `value` the MAC covers: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _entry_mac(key: bytes, row: AuditRow, previous: str) -> str:
    fields = [_ENTRY_TAG, row.seq, row.at, row.actor, row.action, row.details, previous]
    return hmac.new(key, canonical_json(fields).encode(), hashlib.sha256).hexdigest()


def _head_mac(key: bytes, seq: int, mac: str) -> str:
    return hmac.new(key, canonical_json([_HEAD_TAG, seq, mac]).encode(), hashlib.sha256).hexdigest()


def _new_row(seq: int, *, action: str, actor: str, details: dict[str, Detail]) -> AuditRow:
    at = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
    return AuditRow(seq=seq, at=at, actor=actor, action=action, details=canonical_json(details))


def _newest_segment(key: bytes, rows: list[AuditRow]) -> tuple[list[AuditRow], int]:
    """(The rows from the newest reseal entry that matches `key`, the seq before it): only
    that segment is checked. Without one, every row (0). A reseal entry is chained on
    nothing, so one forged without the key does not match and starts nothing."""
    for index in range(len(rows) - 1, -1, -1):
        row = rows[index]
        if row.action == RESEALED and hmac.compare_digest(row.mac, _entry_mac(key, row, "")):
            return rows[index:], row.seq - 1
    return rows, 0


def _span(first: int, last: int) -> str:
    return f"entry {first}" if first == last else f"entries {first}-{last}"


class AuditLog:
    """The audit log of one coordinator state folder (see the module docstring)."""

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

    def append(self, action: str, *, actor: str, **details: Detail) -> AuditEntry:
        """Record `action` by `actor`; return the entry. Raises `AuditError` when the log is
        damaged (key or head mark missing or forged) or cannot be written."""
        for name, value in details.items():
            if not isinstance(value, Detail):
                raise TypeError(f"audit detail {name}={value!r}: use text, numbers or None")
        with self._failures("written"), self._locked():
            key = self._key_for_append()
            seq, previous = self._tail(key)
            row = _new_row(seq + 1, action=action, actor=actor, details=details)
            row.mac = _entry_mac(key, row, previous)
            self._insert(row)
            self._write_head(key, row.seq, row.mac)
        return self._entry(row)

    def entries(self) -> list[AuditEntry]:
        """Every entry, in sequence order."""
        with self._failures("read"):
            return [self._entry(row) for row in self._rows()]

    def verify(self) -> list[str]:
        """What is wrong with the log's newest segment (see the module docstring), one line
        each; [] when it is intact."""
        with self._failures("read"):
            with self._locked():
                rows = self._rows()
                key = self._read_key()
                head_text = self._read_head_text()
            return self._problems(key, rows, head_text)

    def _problems(self, key: bytes | None, rows: list[AuditRow], head: str | None) -> list[str]:
        if key is None:
            if not rows and head is None:
                return []
            return [f"the audit key {self.directory.audit_key} is missing: nothing can be checked"]
        rows, start = _newest_segment(key, rows)
        problems, altered = self._check_chain(key, rows, start)
        head_problems, head_valid = self._check_head(key, rows, head)
        if rows and len(altered) == len(rows) and not head_valid:
            return [
                f"no entry matches the key in {self.directory.audit_key}: the key was replaced "
                "(or every entry and the head mark were altered)"
            ]
        return problems + head_problems

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
        with self._failures("resealed"), self._locked():
            last = self._last_row()
            before = last.seq if last is not None else 0
            shown = problems[:_PROBLEMS_RECORDED]
            hidden = len(problems) - len(shown)
            details: dict[str, Detail] = {
                "reason": reason.strip(),
                "problems": "; ".join(shown) + (f"; and {hidden} more" if hidden else ""),
                "unchecked_entries": before,
            }
            key = self._replace_key()
            row = _new_row(before + 1, action=RESEALED, actor=actor, details=details)
            row.mac = _entry_mac(key, row, "")
            self._insert(row)
            self._write_head(key, row.seq, row.mac)
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

    # -- appending ---------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive across processes and threads (each call opens its own descriptor)."""
        descriptor = os.open(self.directory.audit_lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # releases the lock

    def _key_for_append(self) -> bytes:
        """The key; created (0600, exclusively) only for a log that has nothing yet."""
        key = self._read_key()
        if key is not None:
            return key
        if self._last_row() is not None or self.directory.audit_head.exists():
            raise AuditError(
                f"the audit key {self.directory.audit_key} is missing but the log has entries: "
                f"they can no longer be checked, and nothing is appended to them ({_RECOVERY})"
            )
        return self._create_key()

    def _create_key(self) -> bytes:
        """A new key, written exclusively (0600): never over one another writer just made."""
        key = secrets.token_bytes(32)
        descriptor = os.open(self.directory.audit_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as stream:
            stream.write(key.hex() + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        return key

    def _replace_key(self) -> bytes:
        """For a reseal: the old key (if any) moved aside, kept for inspection; a new one."""
        path = self.directory.audit_key
        if path.exists() or path.is_symlink():
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            os.replace(path, path.with_name(f"{path.name}.replaced-{stamp}"))
        return self._create_key()

    def _tail(self, key: bytes) -> tuple[int, str]:
        """(seq, MAC) of the entry the next one chains on: the head mark's, or a newer row
        that chains on it (an append cut short between its commit and its head mark)."""
        head_text = self._read_head_text()
        last = self._last_row()
        if head_text is None:
            if last is None:
                return 0, ""
            raise AuditError(
                f"the audit head mark {self.directory.audit_head} is missing but the log has "
                "entries: deleting the newest entries could go unnoticed, so nothing is "
                f"appended ({_RECOVERY})"
            )
        seq, mac = self._parse_head(key, head_text)
        if last is not None and last.seq > seq:
            return self._roll_forward(key, seq, mac)
        return seq, mac

    def _roll_forward(self, key: bytes, seq: int, mac: str) -> tuple[int, str]:
        with Session(self.engine) as session:
            newer = session.scalars(
                select(AuditRow).where(AuditRow.seq > seq).order_by(AuditRow.seq)
            ).all()
        for row in newer:
            if row.seq != seq + 1 or not hmac.compare_digest(row.mac, _entry_mac(key, row, mac)):
                raise AuditError(
                    f"audit entries after {seq} (the head mark's) do not chain on it: they were "
                    f"inserted, so nothing is appended ({_RECOVERY})"
                )
            seq, mac = row.seq, row.mac
        return seq, mac

    def _insert(self, row: AuditRow) -> None:
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                session.add(row)
        except IntegrityError as error:
            raise AuditError(
                f"audit entry {row.seq} already exists: the log was changed behind its head "
                f"mark ({_RECOVERY})"
            ) from error

    def _write_head(self, key: bytes, seq: int, mac: str) -> None:
        text = canonical_json({"seq": seq, "mac": mac, "head_mac": _head_mac(key, seq, mac)})
        write_atomic(self.directory.audit_head, text + "\n", mode=0o600)

    # -- reading -----------------------------------------------------------------------------

    def _read_key(self) -> bytes | None:
        try:
            text = self.directory.audit_key.read_text().strip()
        except FileNotFoundError:
            return None
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise AuditError(f"{self.directory.audit_key}: not an audit key (64 hex digits)")
        return key

    def _read_head_text(self) -> str | None:
        try:
            return self.directory.audit_head.read_text()
        except FileNotFoundError:
            return None

    def _parse_head(self, key: bytes, text: str) -> tuple[int, str]:
        """(seq, MAC) from the head mark; `AuditError` if it is unreadable or forged."""
        try:
            head = json.loads(text)
            seq, mac, head_mac = int(head["seq"]), str(head["mac"]), str(head["head_mac"])
        except (ValueError, KeyError, TypeError):
            raise AuditError(f"{self.directory.audit_head}: unreadable head mark") from None
        if not hmac.compare_digest(head_mac, _head_mac(key, seq, mac)):
            raise AuditError(
                f"{self.directory.audit_head}: the head mark does not match the audit key "
                f"(altered, or the key was replaced; {_RECOVERY})"
            )
        return seq, mac

    def _last_row(self) -> AuditRow | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.scalars(select(AuditRow).order_by(AuditRow.seq.desc()).limit(1)).first()

    def _rows(self) -> list[AuditRow]:
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(select(AuditRow).order_by(AuditRow.seq)).all())

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

    # -- checking ----------------------------------------------------------------------------

    def _check_chain(
        self, key: bytes, rows: list[AuditRow], start: int = 0
    ) -> tuple[list[str], list[int]]:
        """Gaps and entries whose MAC does not hold (each chained on the row stored before;
        the first on nothing, after entry `start`)."""
        problems: list[str] = []
        altered: list[int] = []
        seq, previous = start, ""
        for row in rows:
            if row.seq != seq + 1:
                problems.append(f"{_span(seq + 1, row.seq - 1)} missing (deleted)")
            if not hmac.compare_digest(row.mac, _entry_mac(key, row, previous)):
                altered.append(row.seq)
                problems.append(
                    f"entry {row.seq} ({row.action}) does not match its MAC: altered, moved, "
                    "or the entry before it was removed"
                )
            seq, previous = row.seq, row.mac
        return problems, altered

    def _check_head(
        self, key: bytes, rows: list[AuditRow], text: str | None
    ) -> tuple[list[str], bool]:
        """Whether the log reaches the entry the head mark names; (problems, head valid)."""
        if text is None:
            if not rows:
                return [], False
            return [
                f"the head mark {self.directory.audit_head} is missing: deleting the newest "
                "entries would go unnoticed"
            ], False
        try:
            seq, mac = self._parse_head(key, text)
        except AuditError as error:
            return [str(error)], False
        last = rows[-1] if rows else None
        last_seq = last.seq if last is not None else 0
        if seq > last_seq:
            return [f"{_span(last_seq + 1, seq)} missing: the newest entries were deleted"], True
        if seq < last_seq:
            return [
                f"{_span(seq + 1, last_seq)} newer than the head mark (entry {seq}): inserted, "
                "or an append was cut short"
            ], True
        if last is not None and not hmac.compare_digest(mac, last.mac):
            return [f"entry {seq} is not the one the head mark records (replaced)"], True
        return [], True
