"""Is a run's app confide's own ClientApp? Decided from the FAB's bytes alone.

A FAB that `flwr run` builds from a folder holding only a pyproject.toml (what
`confide-server submit` writes) is a zip of exactly two members: `pyproject.toml` and
Flower's manifest `.info/CONTENT` (one line: path, SHA-256, size in bits). Such an app carries
no code: its pyproject only names components that every institution has installed. So an app
is accepted only if

- its bytes hash to the hash the run declares (what the coordinator's SuperLink stored);
- it is a zip whose members are `pyproject.toml` and, optionally, a manifest that describes
  exactly that file: any other member (a `.py`, `.so`, `.pth`, data, a folder) is refused,
  because nothing but confide's installed code may run here;
- its pyproject names `confide.client.app:app` as the ClientApp.

The archive is read with `zipfile` and the pyproject parsed with `tomllib`, nothing else: the
FAB is never installed, nothing in it is imported, no dependency is installed. A refusal's
message is one clause about the app (never about this host) that the runner sends back.
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
import zlib
from typing import Any

from flwr.supercore.fab import Fab

from confide.common.errors import AppRefused

CLIENTAPP = "confide.client.app:app"
PYPROJECT = "pyproject.toml"
MANIFEST = ".info/CONTENT"
# A generated pyproject is a few KiB (the job is JSON in its run config); this bounds what a
# hostile archive can make this process inflate.
MAX_PYPROJECT_BYTES = 1 << 20
# What a refusal shows of names the app chose (never more than this many, each clipped).
_SHOWN_NAMES = 3
_SHOWN_CHARS = 80
# What reading a hostile archive can raise (corrupt, truncated, encrypted, unsupported).
_UNREADABLE = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    OSError,
    RuntimeError,
    NotImplementedError,
    ValueError,
    zlib.error,
)


def check_app(fab: Fab, declared_hash: str) -> None:
    """Accept the app in `fab` (whose run declares `declared_hash`) or raise AppRefused."""
    _check_hash(fab, declared_hash)
    try:
        with zipfile.ZipFile(io.BytesIO(fab.content)) as archive:
            pyproject = _only_pyproject(archive)
    except AppRefused:
        raise
    except _UNREADABLE:
        raise AppRefused("its app is not a readable FAB (zip archive)") from None
    _check_clientapp(_parse(pyproject))


def _check_hash(fab: Fab, declared_hash: str) -> None:
    """The bytes are those the run was started with (the SuperLink keys FABs by SHA-256)."""
    actual = hashlib.sha256(fab.content).hexdigest()
    if not (fab.hash_str == declared_hash == actual):
        raise AppRefused("its app's bytes do not match the hash the run declares")


def _only_pyproject(archive: zipfile.ZipFile) -> bytes:
    """The pyproject's bytes, if the archive holds nothing else than it and its manifest."""
    names = [member.filename for member in archive.infolist()]
    if len(names) != len(set(names)):
        raise AppRefused("its app holds the same file name twice")
    others = [name for name in names if name not in (PYPROJECT, MANIFEST)]
    if others:
        raise AppRefused(f"the app carries files other than pyproject.toml: {_shown(others)}")
    if PYPROJECT not in names:
        raise AppRefused("its app has no pyproject.toml")
    pyproject = _read(archive, PYPROJECT)
    if MANIFEST in names:
        _check_manifest(_read(archive, MANIFEST), pyproject)
    return pyproject


def _read(archive: zipfile.ZipFile, name: str) -> bytes:
    """A member's bytes, refused past `MAX_PYPROJECT_BYTES` (a header's size is not trusted)."""
    with archive.open(name) as member:
        data = member.read(MAX_PYPROJECT_BYTES + 1)
    if len(data) > MAX_PYPROJECT_BYTES:
        raise AppRefused(f"its app's {name} is larger than {MAX_PYPROJECT_BYTES} bytes")
    return data


def _check_manifest(manifest: bytes, pyproject: bytes) -> None:
    """Flower's manifest lists exactly the pyproject, with its hash and size."""
    expected = f"{PYPROJECT},{hashlib.sha256(pyproject).hexdigest()},{len(pyproject) * 8}"
    if manifest.decode("utf-8", errors="replace").strip() != expected:
        raise AppRefused(f"its app's manifest ({MANIFEST}) does not describe its pyproject.toml")


def _parse(pyproject: bytes) -> dict[str, Any]:
    try:
        return tomllib.loads(pyproject.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and TOMLDecodeError alike
        raise AppRefused("its app's pyproject.toml is not valid TOML") from None


def _check_clientapp(config: dict[str, Any]) -> None:
    """[tool.flwr.app.components] clientapp is exactly confide's."""
    components: Any = config
    for key in ("tool", "flwr", "app", "components"):
        components = components.get(key) if isinstance(components, dict) else None
    named = components.get("clientapp") if isinstance(components, dict) else None
    if named is None:
        raise AppRefused(f"its app names no ClientApp; this institution runs only {CLIENTAPP}")
    if named != CLIENTAPP:
        raise AppRefused(
            f"its app names ClientApp {_clip(str(named))!r}; this institution runs only {CLIENTAPP}"
        )


def _shown(names: list[str]) -> str:
    """The first few of `names` (chosen by whoever built the app), clipped."""
    shown = ", ".join(_clip(name) for name in names[:_SHOWN_NAMES])
    more = len(names) - _SHOWN_NAMES
    return shown + (f" (and {more} more)" if more > 0 else "")


def _clip(text: str) -> str:
    printable = "".join(c if c.isprintable() else "?" for c in text)
    return printable if len(printable) <= _SHOWN_CHARS else printable[: _SHOWN_CHARS - 3] + "..."
