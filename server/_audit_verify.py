"""Checking the audit log: what is wrong with its newest segment, one line each.

Only the newest segment is checked: from the newest reseal entry that matches the key (a
reseal entry is chained on nothing, so one forged without the key starts nothing), or every
row without one. Each entry must hold its MAC chained on the row stored before it, with no
gap in the sequence, and the log must reach exactly the entry the head mark names.
"""

from __future__ import annotations

import hmac

from confide.common.errors import AuditError
from confide.server._audit_files import AuditFiles
from confide.server._audit_format import RESEALED, entry_mac
from confide.server.state import AuditRow


def problems(
    files: AuditFiles, *, key: bytes | None, rows: list[AuditRow], head: str | None
) -> list[str]:
    """What is wrong with `rows` (every row, in sequence order) under `key` and the head
    mark's text `head`; [] when the newest segment is intact."""
    directory = files.directory
    if key is None:
        if not rows and head is None:
            return []
        return [f"the audit key {directory.audit_key} is missing: nothing can be checked"]
    rows, start = _newest_segment(key, rows)
    found, altered = _check_chain(key, rows, start)
    head_problems, head_valid = _check_head(files, key, rows, head)
    if rows and len(altered) == len(rows) and not head_valid:
        return [
            f"no entry matches the key in {directory.audit_key}: the key was replaced "
            "(or every entry and the head mark were altered)"
        ]
    return found + head_problems


def _newest_segment(key: bytes, rows: list[AuditRow]) -> tuple[list[AuditRow], int]:
    """(The rows from the newest reseal entry that matches `key`, the seq before it): only
    that segment is checked. Without one, every row (0). A reseal entry is chained on
    nothing, so one forged without the key does not match and starts nothing."""
    for index in range(len(rows) - 1, -1, -1):
        row = rows[index]
        if row.action == RESEALED and hmac.compare_digest(row.mac, entry_mac(key, row, "")):
            return rows[index:], row.seq - 1
    return rows, 0


def _span(first: int, last: int) -> str:
    return f"entry {first}" if first == last else f"entries {first}-{last}"


def _check_chain(key: bytes, rows: list[AuditRow], start: int = 0) -> tuple[list[str], list[int]]:
    """Gaps and entries whose MAC does not hold (each chained on the row stored before;
    the first on nothing, after entry `start`)."""
    found: list[str] = []
    altered: list[int] = []
    seq, previous = start, ""
    for row in rows:
        if row.seq != seq + 1:
            found.append(f"{_span(seq + 1, row.seq - 1)} missing (deleted)")
        if not hmac.compare_digest(row.mac, entry_mac(key, row, previous)):
            altered.append(row.seq)
            found.append(
                f"entry {row.seq} ({row.action}) does not match its MAC: altered, moved, "
                "or the entry before it was removed"
            )
        seq, previous = row.seq, row.mac
    return found, altered


def _check_head(
    files: AuditFiles, key: bytes, rows: list[AuditRow], text: str | None
) -> tuple[list[str], bool]:
    """Whether the log reaches the entry the head mark names; (problems, head valid)."""
    if text is None:
        if not rows:
            return [], False
        return [
            f"the head mark {files.directory.audit_head} is missing: deleting the newest "
            "entries would go unnoticed"
        ], False
    try:
        seq, mac = files.parse_head(key, text)
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
