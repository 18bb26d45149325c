"""Where the files of one ledger folder live, and reading its key.

Beside the database, key and mark, a creation, a reseal and an import stage files that a
rename puts in place (see `confide.privacy.ledger`): their names are here, in one place, so
that every step that writes, adopts or clears one names the same file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from confide.common.errors import LedgerError, LedgerTampered
from confide.privacy._ledger_format import KEY, LEDGER, MARK


@dataclass(frozen=True)
class LedgerFiles:
    """The files of the ledger in `root` (an institution's state directory)."""

    root: Path

    @property
    def path(self) -> Path:
        return self.root / LEDGER

    @property
    def key_path(self) -> Path:
        return self.root / KEY

    @property
    def mark_path(self) -> Path:
        return self.root / MARK

    # Staged beside the ledger: a new database, key and mark (`create`, `reseal`) and the copy
    # an import is made in (`import_from`), each put in place by a rename.
    @property
    def staged_database(self) -> Path:
        return self.root / f".{LEDGER}.new"

    @property
    def staged_key(self) -> Path:
        return self.root / f".{KEY}.new"

    @property
    def staged_mark(self) -> Path:
        return self.root / f".{MARK}.new"

    @property
    def staged_import(self) -> Path:
        return self.root / f".{LEDGER}.import"

    def exists(self) -> bool:
        return self.path.is_file()

    def taken(self) -> bool:
        """A ledger, its key or its mark is here: nothing new is made over any of them."""
        return self.exists() or self.key_path.exists() or self.mark_path.exists()

    def import_cut_short(self) -> bool:
        """An import stopped before its database was put in place: its staged copy is here,
        the ledger is not."""
        return not self.exists() and self.staged_import.is_file()

    def tampered(self, problems: list[str]) -> LedgerTampered:
        """The error for this ledger failing verification with `problems`."""
        return LedgerTampered(self.path, problems)

    def read_key(self) -> bytes:
        """The ledger's key: LedgerTampered if it is missing or no key, LedgerError if the
        environment stops the read. A staged key is never adopted here (see `create`)."""
        try:
            key = self.key_path.read_bytes()
        except FileNotFoundError:
            problem = f"the ledger's key {self.key_path} is missing"
            if self.staged_key.is_file():  # a creation's is put in place before this read
                problem += (
                    f" (the key staged beside it, {self.staged_key.name}, left by a reseal cut "
                    "short or planted, is never adopted by itself: run the reseal again)"
                )
            raise self.tampered([problem]) from None
        except OSError as error:
            raise LedgerError(f"{self.key_path}: cannot read the ledger key: {error}") from None
        if len(key) != 32:
            raise self.tampered([f"{self.key_path} is not a 32-byte key"])
        return key
