"""Crash-safe file writes, shared by every package that keeps state on disk.

It lives in `common` because that is the one package all others may import.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over `path`.

    A crash leaves either the old file or the new one, never half of one; `mode` applies from
    the first byte, so a secret is never readable by others, even briefly.
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(handle, mode)
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
