"""The audit log's files in the state folder: its key (`audit.key`), its head mark
(`audit.head`) and its lock (`audit.lock`).

The key is written exclusively (never over one another writer just made) and fsynced; the
head mark is MAC'd and replaced atomically; the lock is an exclusive `fcntl` lock that makes
each append one step across processes (a reader that only verifies takes it shared, on a
read-only descriptor: `AuditFiles.shared`). Their `OSError`s pass through: `AuditLog` turns them
into `AuditUnavailable`.
"""

from __future__ import annotations

import datetime
import fcntl
import hmac
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from confide.common.errors import AuditError
from confide.common.files import write_atomic
from confide.server._audit_format import RECOVERY, canonical_json, head_mac
from confide.server.settings import StateDir


class AuditFiles:
    """The key, head mark and lock of the audit log of `directory`."""

    def __init__(self, directory: StateDir) -> None:
        self.directory = directory

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across processes and threads (each call opens its own descriptor)."""
        descriptor = os.open(self.directory.audit_lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # releases the lock

    @contextmanager
    def shared(self) -> Iterator[None]:
        """A reader's lock: shared, on a read-only descriptor of the existing lock file.

        Readers (the dashboard, `verify` from a process that may not write the state folder)
        then neither wait for one another nor need write access, and create nothing: a
        missing lock file is `FileNotFoundError`. An append still waits for the read to end,
        so what is read under it is one consistent state of the log."""
        descriptor = os.open(self.directory.audit_lock, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH)
            yield
        finally:
            os.close(descriptor)  # releases the lock

    # -- the key -----------------------------------------------------------------------------

    def read_key(self) -> bytes | None:
        """The key; None if there is none, `AuditError` if the file holds no key."""
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

    def create_key(self) -> bytes:
        """A new key, written exclusively (0600): never over one another writer just made."""
        key = secrets.token_bytes(32)
        descriptor = os.open(self.directory.audit_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as stream:
            stream.write(key.hex() + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        return key

    def replace_key(self) -> bytes:
        """For a reseal: the old key (if any) moved aside, kept for inspection; a new one."""
        path = self.directory.audit_key
        if path.exists() or path.is_symlink():
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            os.replace(path, path.with_name(f"{path.name}.replaced-{stamp}"))
        return self.create_key()

    # -- the head mark -----------------------------------------------------------------------

    def read_head_text(self) -> str | None:
        try:
            return self.directory.audit_head.read_text()
        except FileNotFoundError:
            return None

    def parse_head(self, key: bytes, text: str) -> tuple[int, str]:
        """(seq, MAC) from the head mark; `AuditError` if it is unreadable or forged."""
        try:
            head = json.loads(text)
            seq, mac, stored = int(head["seq"]), str(head["mac"]), str(head["head_mac"])
        except (ValueError, KeyError, TypeError):
            raise AuditError(f"{self.directory.audit_head}: unreadable head mark") from None
        if not hmac.compare_digest(stored, head_mac(key, seq, mac)):
            raise AuditError(
                f"{self.directory.audit_head}: the head mark does not match the audit key "
                f"(altered, or the key was replaced; {RECOVERY})"
            )
        return seq, mac

    def write_head(self, key: bytes, seq: int, mac: str) -> None:
        text = canonical_json({"seq": seq, "mac": mac, "head_mac": head_mac(key, seq, mac)})
        write_atomic(self.directory.audit_head, text + "\n", mode=0o600)
