"""The messages this institution's runner has served: a message is answered at most once.

Flower's SuperNode makes a task for every message it pulls, and a message can come back: the
SuperLink hands out again a message whose delivery it did not see confirmed, and a SuperNode
forgets a message once its reply left (`start_client_internal._push_messages`), so a copy
that arrives later is a new task for it. Under load the same happens through task tokens: a
task whose token expired before it started goes back to pending and is handed out again.
Flower does not promise exactly-once delivery; training is not idempotent (a second DP-SGD
pass on the same round spends the budget again and sends a second update), so the runner
keeps its own record.

A message is claimed, by its id, before the app sees it, and the claim is written to
`STATE/served-messages.json` (atomically, mode 0600) before training starts: a runner that
dies mid-round and restarts refuses the copy that follows, rather than train the round again.
That loses the institution's part of that one round; it never spends a round twice. The
message id is Flower's content hash of the message (its run, round, destination and creation
time included), so a resumed job's rounds, sent as new messages, are new ids.

The file keeps the last `KEPT` ids: a copy comes back within a round's timeout, thousands of
messages later no copy is still in flight.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

from pydantic import ValidationError

from confide.common.config import StrictModel
from confide.common.errors import RunnerError
from confide.common.files import write_atomic

SERVED_FILE = "served-messages.json"
KEPT = 4096


class ServedRecord(StrictModel):
    """What `served-messages.json` holds: the ids of the last messages served, oldest first."""

    message_ids: list[str]


class ServedMessages:
    """The ids of the messages served from `folder` (the institution's), read once."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / SERVED_FILE
        self._ids: deque[str] = deque(_read(self.path), maxlen=KEPT)
        self._seen = set(self._ids)

    def claim(self, message_id: str) -> bool:
        """Record `message_id` as served (written before this returns); False, with nothing
        written, if it was served before."""
        if message_id in self._seen:
            return False
        if len(self._ids) == KEPT:
            self._seen.discard(self._ids[0])
        self._ids.append(message_id)
        self._seen.add(message_id)
        record = ServedRecord(message_ids=list(self._ids))
        write_atomic(self.path, record.model_dump_json(), mode=0o600)
        return True


def _read(path: Path) -> list[str]:
    """The ids in `path` (none if there is no file yet); RunnerError if it is unreadable:
    starting with an empty record would let a copy of a served message train again."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise RunnerError(f"{path}: cannot be read: {error}") from error
    try:
        return ServedRecord.model_validate_json(text).message_ids[-KEPT:]
    except ValidationError as error:
        raise RunnerError(
            f"{path}: not a record of served messages ({error.error_count()} problems); "
            "move it away only if no job is running, as the runner then forgets what it served"
        ) from error
