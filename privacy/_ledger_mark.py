"""The ledger's head mark (`ledger.head`): its newest (count, mac), kept outside the database
under its own HMAC.

Why: a copy of the database alone restored from an older backup verifies as a chain; only
the mark, written after each commit, shows that it is behind. The order of the steps is what
makes this crash-safe: the mark is read before the database (a commit in between leaves the
database ahead of it, which verification accepts) and written after the commit (a failure
leaves the database ahead, never behind). A creation or a reseal stages its mark before its
commit and puts it in place after; a staged mark that fits the chain is accepted and adopted.
"""

from __future__ import annotations

import hmac
import json
from contextlib import suppress
from pathlib import Path

from confide.common.errors import LedgerError
from confide.common.files import write_atomic
from confide.privacy._ledger_files import LedgerFiles
from confide.privacy._ledger_format import Entry, mac, same

# The mark and a reseal's staged mark, as read (None: missing, "": not a readable text).
Marks = tuple[str | None, str | None]


def mark_text(key: bytes, count: int, last_mac: str) -> str:
    mark = {"count": count, "last_mac": last_mac, "mac": mac(key, "mark", (count, last_mac))}
    return json.dumps(mark) + "\n"


class HeadMark:
    """The mark of the ledger whose files are `files`, and the one staged beside it."""

    def __init__(self, files: LedgerFiles) -> None:
        self.files = files

    def write(self, key: bytes, count: int, last_mac: str) -> None:
        """Record the newest (count, mac) outside the database, after each commit: a copy of
        the database alone restored from an older backup is then behind its mark."""
        write_atomic(self.files.mark_path, mark_text(key, count, last_mac), mode=0o600)

    def stage(self, key: bytes, count: int, last_mac: str) -> None:
        """Write the mark beside its final name, for a rename after the commit it records."""
        write_atomic(self.files.staged_mark, mark_text(key, count, last_mac), mode=0o600)

    def read(self, path: Path | None = None) -> str | None:
        """The mark's text (None if missing, "" if not a readable text file); `path` reads a
        staged mark instead. Read before the database, so that a commit in between leaves the
        database ahead of it, which verification accepts."""
        path = path or self.files.mark_path
        try:
            return path.read_text()
        except FileNotFoundError:
            return None
        except PermissionError as error:  # the environment, not the content
            raise LedgerError(f"{path}: cannot read the ledger's mark: {error}") from None
        except (OSError, UnicodeDecodeError):
            return ""

    def read_both(self) -> Marks:
        """The mark and a reseal's staged mark, in that order (see `read`)."""
        return self.read(), self.read(self.files.staged_mark)

    def state(self, key: bytes, entries: list[Entry], text: str | None) -> tuple[list[str], bool]:
        """The problems of the mark `text`, and whether it shows the database behind it (an
        older copy restored, or entries deleted)."""
        mark_path = self.files.mark_path
        if text is None:
            return [f"{mark_path} (the record of the newest entry) is missing"], False
        try:
            mark = json.loads(text)
            count, last_mac = int(mark["count"]), str(mark["last_mac"])
            valid = hmac.compare_digest(str(mark["mac"]), mac(key, "mark", (count, last_mac)))
        except (ValueError, KeyError, TypeError):
            return [f"{mark_path} is unreadable"], False
        if not valid:
            return [f"{mark_path} was altered"], False
        if count > len(entries):
            behind = (
                f"the ledger holds {len(entries)} entries but had reached {count} "
                "(an older copy restored, or entries deleted)"
            )
            return [behind], True
        # The database may be ahead of the mark (a crash, or a failed write, after a commit).
        if count and not same(entries[count - 1].mac, last_mac):
            return [f"entry {count} is not the one the ledger last recorded"], False
        return [], False

    def staged_fits(self, key: bytes, entries: list[Entry], staged: str | None) -> bool:
        """A staged mark passes as the mark would, and names an entry: a creation's (count 0)
        would fit any chain."""
        if not staged or self.state(key, entries, staged)[0]:
            return False
        return int(json.loads(staged)["count"]) >= 1

    def adopt(self, text: str) -> None:
        """Put a fitting staged mark in place; best effort: it is accepted where it is."""
        with suppress(OSError):
            write_atomic(self.files.mark_path, text, mode=0o600)
            self.files.staged_mark.unlink()

    def advance(self, key: bytes, entry: Entry, what: str) -> None:
        """Write the mark of a committed entry. A failure leaves the entry recorded and the
        database ahead of its mark, which verification accepts; the next entry's mark catches
        up once the cause is fixed."""
        try:
            self.write(key, entry.seq, entry.mac)
        except OSError as error:
            raise LedgerError(
                f"{self.files.path}: {what} was recorded (it stands and counts towards the "
                f"budget: do not record it again), but the mark {self.files.mark_path} could "
                f"not be updated ({error}). The ledger stays valid: its database is ahead of "
                "its mark, which verification accepts, and the next entry recorded updates "
                "the mark once this is fixed (free space on this disk, or make the file "
                "writable)."
            ) from error
        with suppress(OSError):  # a reseal's staged mark is behind the mark just written
            self.files.staged_mark.unlink(missing_ok=True)
