"""The host's index of privacy ledgers: which ledger folders spent budget on which data.

Why: a ledger lives in an institution's folder, so a new folder is a new, empty ledger for
the same data. `confide-client join` looks the data's fingerprint up here and refuses to
start a second budget for it unless the operator continues the old one (`--ledger-from`) or
starts a new one on purpose (`--new-budget --reason`).

The index is one small JSON file per host (per user), default
`${XDG_STATE_HOME:-~/.local/state}/confide/ledgers.json`, or the file `CONFIDE_LEDGER_INDEX`
names:

    {"format": "confide-ledger-index-v1",
     "ledgers": {"sha256:<data file hash>": ["/abs/path/of/a/ledger/folder", ...]}}

It holds no spend: the ledgers do, and are verified when read. It is a guard against
mistakes (a forgotten folder), not against the host's administrator, who can edit it.
Writers take an exclusive lock beside it and replace it atomically.

This module only reads and writes the index. Which folders go into it (an institution's, not
a simulation's) is the client's decision (`confide.client.continuity`): recording a spend in
a ledger writes nothing outside its folder.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from confide.common.errors import LedgerIndexError
from confide.common.files import write_atomic

INDEX_ENV = "CONFIDE_LEDGER_INDEX"
_FORMAT = "confide-ledger-index-v1"


def default_index_path() -> Path:
    """`$CONFIDE_LEDGER_INDEX`, else `${XDG_STATE_HOME:-~/.local/state}/confide/ledgers.json`."""
    if named := os.environ.get(INDEX_ENV):
        return Path(named).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "confide" / "ledgers.json"


class LedgerIndex:
    """The index at `path` (default: `default_index_path()`, read when used)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_index_path()

    def folders(self, fingerprint: str) -> list[Path]:
        """Every ledger folder indexed under `fingerprint` (existing or not)."""
        return [Path(folder) for folder in self._read().get(fingerprint, [])]

    def add(self, fingerprint: str, folder: Path) -> bool:
        """Index `folder` under `fingerprint`; False if it already was (nothing written)."""
        name = str(Path(folder).resolve())
        if name in self._read().get(fingerprint, []):
            return False
        with self._locked():
            ledgers = self._read()
            if name in ledgers.get(fingerprint, []):
                return False
            ledgers.setdefault(fingerprint, []).append(name)
            text = json.dumps({"format": _FORMAT, "ledgers": ledgers}, indent=1) + "\n"
            try:
                write_atomic(self.path, text, mode=0o600)
            except OSError as error:
                raise LedgerIndexError(
                    f"{self.path}: cannot write the ledger index: {error}"
                ) from error
        return True

    def _read(self) -> dict[str, list[str]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as error:
            raise LedgerIndexError(f"{self.path}: cannot read the ledger index: {error}") from None
        try:
            content = json.loads(text)
            ledgers = content["ledgers"]
            valid = content["format"] == _FORMAT and all(
                isinstance(folders, list) and all(isinstance(f, str) for f in folders)
                for folders in ledgers.values()
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            valid = False
        if not valid:
            raise LedgerIndexError(
                f"{self.path}: not a confide ledger index; repair it or move it away (every "
                "ledger is indexed again at its next round or `confide-client budget verify`)"
            )
        return ledgers

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on `<index>.lock`: two writers cannot lose each other's entry."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            handle = os.open(
                self.path.with_name(self.path.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600
            )
        except OSError as error:
            raise LedgerIndexError(f"{self.path}: cannot lock the ledger index: {error}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        finally:
            os.close(handle)
