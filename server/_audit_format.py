"""The audit log's entries as the MACs cover them (the design is in `confide.server.audit`).

Everything here decides what an existing log verifies as: a change to a tag, a field's
order or the canonical text makes every entry already written fail verification.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
from typing import Any

from confide.server.state import AuditRow

Detail = str | int | float | bool | None
RESEALED = "audit.resealed"
_ENTRY_TAG = "confide-audit-entry-v1"
_HEAD_TAG = "confide-audit-head-v1"
# How to get out of a refused append: said by every error that refuses one.
RECOVERY = (
    "see `confide-server audit verify`; once the cause is understood, "
    "`confide-server audit reseal --dir STATE --reason TEXT` starts a new segment"
)


def canonical_json(value: Any) -> str:
    """The one text of `value` the MAC covers: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_mac(key: bytes, row: AuditRow, previous: str) -> str:
    fields = [_ENTRY_TAG, row.seq, row.at, row.actor, row.action, row.details, previous]
    return hmac.new(key, canonical_json(fields).encode(), hashlib.sha256).hexdigest()


def head_mac(key: bytes, seq: int, mac: str) -> str:
    return hmac.new(key, canonical_json([_HEAD_TAG, seq, mac]).encode(), hashlib.sha256).hexdigest()


def new_row(seq: int, *, action: str, actor: str, details: dict[str, Detail]) -> AuditRow:
    at = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
    return AuditRow(seq=seq, at=at, actor=actor, action=action, details=canonical_json(details))
