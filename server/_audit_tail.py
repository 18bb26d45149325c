"""Where the next audit entry chains on, and the key it is signed with.

An append chains on the head mark, not on the newest row, so entries deleted from the end
stay missing (a gap `verify` reports) instead of being papered over by the next entry; a
newer row is carried forward only if it chains on the head mark (an append cut short between
its commit and its head mark). An append refuses (`AuditError`) to extend a log whose key or
head mark is gone or forged: the log never grows past damage it cannot carry forward.
"""

from __future__ import annotations

import hmac

from confide.common.errors import AuditError
from confide.server._audit_files import AuditFiles
from confide.server._audit_format import RECOVERY, entry_mac
from confide.server._audit_store import AuditStore


class AuditTail:
    """The end of the log an append extends; the caller holds the log's lock."""

    def __init__(self, files: AuditFiles, store: AuditStore) -> None:
        self.files = files
        self.store = store

    def key(self) -> bytes:
        """The key; created (0600, exclusively) only for a log that has nothing yet."""
        key = self.files.read_key()
        if key is not None:
            return key
        directory = self.files.directory
        if self.store.last_row() is not None or directory.audit_head.exists():
            raise AuditError(
                f"the audit key {directory.audit_key} is missing but the log has entries: "
                f"they can no longer be checked, and nothing is appended to them ({RECOVERY})"
            )
        return self.files.create_key()

    def position(self, key: bytes) -> tuple[int, str]:
        """(seq, MAC) of the entry the next one chains on: the head mark's, or a newer row
        that chains on it (an append cut short between its commit and its head mark)."""
        head_text = self.files.read_head_text()
        last = self.store.last_row()
        if head_text is None:
            if last is None:
                return 0, ""
            raise AuditError(
                f"the audit head mark {self.files.directory.audit_head} is missing but the log "
                "has entries: deleting the newest entries could go unnoticed, so nothing is "
                f"appended ({RECOVERY})"
            )
        seq, mac = self.files.parse_head(key, head_text)
        if last is not None and last.seq > seq:
            return self._roll_forward(key, seq, mac)
        return seq, mac

    def _roll_forward(self, key: bytes, seq: int, mac: str) -> tuple[int, str]:
        """The newest of the rows after the head mark's entry, each chaining on the one
        before it; `AuditError` if one does not (it was inserted)."""
        for row in self.store.rows_after(seq):
            if row.seq != seq + 1 or not hmac.compare_digest(row.mac, entry_mac(key, row, mac)):
                raise AuditError(
                    f"audit entries after {seq} (the head mark's) do not chain on it: they were "
                    f"inserted, so nothing is appended ({RECOVERY})"
                )
            seq, mac = row.seq, row.mac
        return seq, mac
