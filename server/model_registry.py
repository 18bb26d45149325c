"""The coordinator's model registry: every deployed run's model, versioned per name.

When a deployed run ends with a model, its files (`model.safetensors`, `model.json`, see
confide.server.model_file) are copied into the state directory under `models/NAME/VERSION/`
and a row of the `model_versions` table records the version, the weights' SHA-256 and the card.
Versions are numbered 1, 2, ... per name in the order they are registered and never change: no
command overwrites or deletes one. `list` and `show` read the rows; every use of the files
(`load`, `export`) first checks them against the row (the card must be the one registered,
the weights must have its hash), so a changed file is refused rather than used or handed on.

NAME is the job's `[model] name` (by default `<task>-<model kind>`, confide.server.job); a job
continues a registered version with `[model] init = "NAME:VERSION"`.
"""

from __future__ import annotations

import fcntl
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from confide.common.errors import ModelFileError, RegistryError
from confide.server.model_file import (
    CARD,
    MODEL_NAME,
    VERSION_REFERENCE,
    WEIGHTS,
    ModelCard,
    RegistryEntry,
    read_card,
    read_weights,
    save_model,
)
from confide.server.state import ModelVersionRow

LOCK = ".lock"  # held while a version is numbered, placed and committed

if TYPE_CHECKING:
    import torch
    from sqlalchemy import Engine

    from confide.server.settings import StateDir


@dataclass(frozen=True)
class RegisteredModel:
    """One registered version, as its row records it."""

    name: str
    version: int
    sha256: str
    run: str
    created_at: datetime
    card: ModelCard

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.version}"


def parse_reference(reference: str) -> tuple[str, int]:
    """(name, version) of `name:version`, or RegistryError saying what a reference is."""
    match = re.match(VERSION_REFERENCE, reference)
    if match is None:
        raise RegistryError(
            f"{reference!r} is not a model version: write NAME:VERSION, e.g. digits-mlp:3 "
            "(`confide-server models list` shows them)"
        )
    return match["name"], int(match["version"])


class ModelRegistry:
    """The registered models of one coordinator (its state directory and database)."""

    def __init__(self, state: StateDir, engine: Engine) -> None:
        self.folder = state.models
        self.engine = engine

    def register(self, name: str, card: ModelCard, weights: bytes) -> ModelCard:
        """Register `weights` with its `card` as the next version of `name`; returns the card
        as registered (naming its version).

        Under an exclusive lock on the registry's folder (runs that end at once register one
        after the other): the version's files are in place before its row commits, so a
        registered version always has its files; a crash in between leaves a folder without
        a row, which the next registration of that number replaces. A folder with a row is
        never touched."""
        if re.fullmatch(MODEL_NAME, name) is None:
            raise RegistryError(f"{name!r} is not a model name (letters, digits, '.', '_', '-')")
        self.folder.mkdir(parents=True, exist_ok=True)
        with _locked(self.folder / LOCK):
            version = self._next_version(name)
            registered = card.model_copy(
                update={"registry": RegistryEntry(name=name, version=version)}
            )
            self._place(self.folder / name / str(version), registered, weights)
            with Session(self.engine) as session, session.begin():
                session.add(
                    ModelVersionRow(
                        name=name,
                        version=version,
                        sha256=card.weights.sha256,
                        run=card.run.run,
                        created_at=datetime.now(UTC),
                        card=registered.model_dump_json(),
                    )
                )
        return registered

    def _next_version(self, name: str) -> int:
        with Session(self.engine) as session:
            latest = session.scalar(
                select(func.max(ModelVersionRow.version)).where(ModelVersionRow.name == name)
            )
        return (latest or 0) + 1

    def _place(self, final: Path, card: ModelCard, weights: bytes) -> None:
        """Write the version's files in a staging folder, then move it to `final`, read-only.
        Called under the lock, for a number no row holds: what is there is a crash's."""
        final.parent.mkdir(parents=True, exist_ok=True)
        for leftover in final.parent.glob(f".{final.name}-*"):  # staging a crash left
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        save_model(staging, card, weights)
        for file in (WEIGHTS, CARD):
            (staging / file).chmod(0o444)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)

    def versions(self, name: str | None = None) -> list[RegisteredModel]:
        """Every registered version (of `name`), by name then version."""
        query = select(ModelVersionRow).order_by(ModelVersionRow.name, ModelVersionRow.version)
        if name is not None:
            query = query.where(ModelVersionRow.name == name)
        with Session(self.engine) as session:
            return [_registered(row) for row in session.scalars(query)]

    def get(self, reference: str) -> RegisteredModel:
        """The version `name:version`, or RegistryError naming what the registry holds."""
        name, version = parse_reference(reference)
        with Session(self.engine) as session:
            row = session.scalar(
                select(ModelVersionRow).where(
                    ModelVersionRow.name == name, ModelVersionRow.version == version
                )
            )
            if row is not None:
                return _registered(row)
            held = session.scalar(
                select(func.max(ModelVersionRow.version)).where(ModelVersionRow.name == name)
            )
        known = f"{name} has versions 1 to {held}" if held else f"no model is named {name}"
        raise RegistryError(f"{reference}: not registered ({known})")

    def folder_of(self, model: RegisteredModel) -> Path:
        return self.folder / model.name / str(model.version)

    def load(self, reference: str) -> tuple[RegisteredModel, dict[str, torch.Tensor]]:
        """A version and its weights, checked against the hash its row recorded."""
        model = self.get(reference)
        folder = self.folder_of(model)
        try:
            if read_card(folder) != model.card:
                raise ModelFileError(
                    f"{folder / CARD} is not the card registered as {reference} (changed)"
                )
            return model, read_weights(folder, model.card)
        except ModelFileError as error:
            raise RegistryError(f"{reference}: its files cannot be used: {error}") from None

    def export(self, reference: str, out: Path) -> list[Path]:
        """Write a version's two files into `out` (made if missing; files there are never
        overwritten) after checking them against its row: the weights, then the card as
        registered, each atomically (the card last: its presence means the export is whole)."""
        model, _ = self.load(reference)
        folder = self.folder_of(model)
        targets = [out / WEIGHTS, out / CARD]
        taken = [str(path) for path in targets if path.exists()]
        if taken:
            raise RegistryError(f"--out {out}: {', '.join(taken)} already exist(s); choose another")
        try:
            save_model(out, model.card, (folder / WEIGHTS).read_bytes())
        except (OSError, ModelFileError) as error:
            raise RegistryError(f"--out {out}: cannot write the model: {error}") from None
        return targets


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (fcntl), across the coordinator's processes."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _registered(row: ModelVersionRow) -> RegisteredModel:
    return RegisteredModel(
        name=row.name,
        version=row.version,
        sha256=row.sha256,
        run=row.run,
        created_at=row.created_at,
        card=ModelCard.model_validate_json(row.card),
    )
