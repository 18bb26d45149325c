"""The trained model as a file: `model.safetensors` and its card, `model.json`.

Every run (simulation or deployment) ends with the global model of its last completed round
written next to its results:

- `model.safetensors`: the weights as named tensors in the safetensors format, which holds
  data only (no pickle: loading a model file never runs code from it);
- `model.json` (`ModelCard`): what rebuilds the architecture (the task's configuration, the
  input shape and the class names), the run and round it comes from, the SHA-256 of the
  weights file, the model's test metrics, its privacy provenance (unit, neighbouring relation,
  accountant, each institution's epsilon and delta, central DP if any, the institutions' data
  commitments) and its lineage: every model it was continued from, with their provenance.

The weights are written first and the card last (both atomically), so a card always names a
complete weights file; reading checks the weights' hash against the card before anything is
built from them. `load_model` rebuilds the task's model and loads the weights into it
(strictly: every name and shape must match).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
from pydantic import ConfigDict, Field, ValidationError, model_validator

from confide.common.config import StrictModel
from confide.common.errors import ModelFileError
from confide.common.files import write_atomic
from confide.privacy.report import (
    INSTITUTION_ACCOUNTANT,
    INSTITUTION_UNIT,
    SAMPLE_ACCOUNTANTS,
    SAMPLE_NEIGHBOURING,
    SAMPLE_UNIT,
    UNBOUNDED,
    LedgerEpsilon,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from confide.server.history import JobHistory
    from confide.server.job import JobConfig
    from confide.server.results import Results
    from confide.tasks.config import TaskConfig
    from confide.tasks.datasets import Dataset

WEIGHTS = "model.safetensors"
CARD = "model.json"
FORMAT: Final = "confide.model/1"
# A registered model version, `digits-mlp:3` (confide.server.model_registry; a job's
# `[model] init`). Kept here, not in confide.server.job, so that reading the registry does not
# import torch and Flower.
# Lower case only: the name is also a folder, and two names differing only in case would be one
# folder on a case-insensitive file system.
MODEL_NAME = r"[a-z0-9][a-z0-9._-]{0,63}"
VERSION_REFERENCE = rf"^(?P<name>{MODEL_NAME}):(?P<version>[1-9][0-9]{{0,8}})$"


class _Document(StrictModel):
    model_config = ConfigDict(use_attribute_docstrings=True)


class ModelWeights(_Document):
    """The weights file the card describes."""

    file: str = Field(default=WEIGHTS, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.safetensors$")
    """The weights file's name, in the card's own folder."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 of the file's bytes, checked before the weights are used."""
    bytes: int
    parameters: int
    """Number of values in all tensors (trainable parameters and buffers)."""


class ModelRun(_Document):
    """The run the model comes from."""

    kind: Literal["simulation", "deployment"]
    name: str
    """The scenario's or the job's name."""
    run: str
    """The deployed run's id, or the simulation's results folder name."""
    round: int
    """The last completed round: the model is the global model after it."""
    rounds_planned: int
    stopped: str | None
    """Why the job ended before its last round, else null."""
    seed: int
    ledgers: str | None = None
    """Where a simulation's virtual institutions keep their ledgers (null in deployment)."""


class InstitutionProvenance(_Document):
    """One institution's sample-level spend on the data behind this model."""

    id: int | str
    rounds_trained: int
    epsilon: float | None
    """This run's epsilon at `delta` (null without DP)."""
    delta: float | None
    dataset_epsilon: LedgerEpsilon
    """Its dataset's cumulative epsilon over every job in its ledger, this one included."""
    dataset_delta: float | None
    dataset_accountant: str | None
    data_commitment: str | None = None
    """HMAC-SHA256 of its dataset's fingerprint under its ledger key: the institution (and
    only it) can match it to the dataset its ledger records; it reveals nothing of the data."""


class CentralProvenance(_Document):
    """Central DP at the coordinator (institution level)."""

    unit: str = INSTITUTION_UNIT
    epsilon: float | None
    """Null if not finite."""
    delta: float
    accountant: str = INSTITUTION_ACCOUNTANT


class PrivacyProvenance(_Document):
    """Under what guarantee the data behind the model was used in this run."""

    dp: bool
    """Whether the institutions trained with DP-SGD."""
    unit: str = SAMPLE_UNIT
    neighbouring: str = SAMPLE_NEIGHBOURING
    accountant: str | None
    """The sample-level accountant (null without DP)."""
    delta: float | None
    epsilon_max: float | None
    """The largest cumulative sample-level epsilon of any institution in this run."""
    institutions: list[InstitutionProvenance]
    institution_level: CentralProvenance | None
    statement: str
    """privacy.json's plain-language paragraph."""


class Ancestor(_Document):
    """A model this one was continued from (its weights were this run's starting point)."""

    sha256: str
    source: str
    """How it was named: a registered version (`name:version`) or a file path."""
    run: ModelRun
    privacy: PrivacyProvenance


class ModelBound(_Document):
    """What protects the data behind the model, over this run and every run of its lineage.

    Sample level: the largest cumulative epsilon any institution's ledger reported in any
    of those runs (a ledger's epsilon covers every run on its dataset, the continued ones
    included), with the largest delta; "unbounded" if any run trained without DP-SGD.
    Institution level: central DP's epsilons and deltas added up over the runs (basic
    composition); "unbounded" if some run of a lineage that used it released a model
    without it; null if none used it."""

    sample_epsilon: LedgerEpsilon
    sample_delta: float | None
    institution_level_epsilon: LedgerEpsilon
    institution_level_delta: float | None


class RegistryEntry(_Document):
    """The model's place in a coordinator's registry."""

    name: str
    version: int


class ModelCard(_Document):
    """model.json: what rebuilds, identifies and qualifies the model in model.safetensors."""

    format: Literal["confide.model/1"] = FORMAT
    created: str
    """UTC time the file was written (ISO 8601)."""
    task: dict[str, Any]
    """The job's `[task]` table (name, model and data settings): the architecture follows
    from it, the input shape and the number of classes."""
    data: dict[str, Any]
    """The job's `[data]` table: with `seed`, it fixes the task's held-out test split."""
    test_set: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    """SHA-256 of the test set `metrics` were measured on (its examples and labels):
    `confide-simulate predict` scores the same set again only if it matches."""
    input_shape: list[int] = Field(min_length=1, max_length=3)
    classes: int = Field(ge=2, le=100_000)
    labels: list[str]
    """Class names: output k is the score of labels[k]."""
    weights: ModelWeights
    metrics: dict[str, float | None]
    """The model's metrics on the coordinator's held-out test set."""
    run: ModelRun
    privacy: PrivacyProvenance
    lineage: list[Ancestor]
    """The models this one continues, nearest first; empty for a model trained from scratch.
    The data behind the model was used under each entry's guarantee and this one's."""
    bound: ModelBound
    """The model's guarantee over this run and its whole lineage."""
    registry: RegistryEntry | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if len(self.labels) != self.classes:
            raise ValueError(f"{len(self.labels)} labels for {self.classes} classes")
        if any(not 1 <= size <= 100_000 for size in self.input_shape):
            raise ValueError(f"input_shape {self.input_shape}: each size must be in 1..100000")
        return self

    def describe(self) -> str:
        """One line: task, round, accuracy and hash."""
        accuracy = self.metrics.get("accuracy")
        scored = f"accuracy {accuracy:.4f}" if accuracy is not None else "no accuracy"
        return (
            f"task {self.task.get('name')}, round {self.run.round} of run {self.run.run}, "
            f"{scored}, sha256 {self.weights.sha256[:12]}"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_weights(state: Mapping[str, torch.Tensor]) -> bytes:
    """The safetensors bytes of a state dict (tensors made contiguous CPU copies)."""
    from safetensors.torch import save

    tensors = {name: value.detach().cpu().contiguous() for name, value in state.items()}
    return save(tensors, metadata={"format": FORMAT})


def weights_info(data: bytes, state: Mapping[str, torch.Tensor]) -> ModelWeights:
    return ModelWeights(
        sha256=_sha256(data),
        bytes=len(data),
        parameters=sum(int(value.numel()) for value in state.values()),
    )


def save_model(directory: Path, card: ModelCard, data: bytes) -> Path:
    """Write `data` (from `encode_weights`) and its `card` into `directory`: the weights
    first, the card last, each atomically. Returns the weights file's path."""
    if _sha256(data) != card.weights.sha256:
        raise ModelFileError("the card's weights hash does not match the weights written")
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / WEIGHTS, data)
    write_atomic(directory / CARD, card.model_dump_json(indent=2) + "\n")
    return directory / WEIGHTS


def card_path(path: Path) -> Path:
    """The card of a model named by its weights file, its card or its folder."""
    path = Path(path)
    if path.is_dir():
        return path / CARD
    if path.name == CARD:
        return path
    return path.with_name(CARD)


def read_card(path: Path) -> ModelCard:
    """The card of the model at `path` (weights file, card or folder), validated."""
    where = card_path(path)
    try:
        text = where.read_text()
    except FileNotFoundError:
        raise ModelFileError(
            f"{where}: no model card (model.json) beside the model; a model file is used only "
            "with the card it was written with"
        ) from None
    except OSError as error:
        raise ModelFileError(f"{where}: cannot read the model card: {error}") from None
    try:
        return ModelCard.model_validate_json(text)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(document)"
        raise ModelFileError(
            f"{where}: not a confide model card ({error.error_count()} problems; first: "
            f"{field}: {first['msg']})"
        ) from None


def read_weights(path: Path, card: ModelCard) -> dict[str, torch.Tensor]:
    """The tensors of the weights file beside `card`, after checking its SHA-256."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    where = card_path(path).with_name(card.weights.file)
    try:
        data = where.read_bytes()
    except OSError as error:
        raise ModelFileError(f"{where}: cannot read the model's weights: {error}") from None
    if _sha256(data) != card.weights.sha256:
        raise ModelFileError(
            f"{where}: the weights' SHA-256 is {_sha256(data)[:16]}..., the card says "
            f"{card.weights.sha256[:16]}...: the file was changed or belongs to another model"
        )
    try:
        return load(data)
    except SafetensorError as error:
        raise ModelFileError(f"{where}: not a safetensors file: {error}") from None


def build_architecture(card: ModelCard) -> nn.Module:
    """The task's model as the card describes it (untrained: weights come from the file)."""
    from confide.tasks.config import TaskConfig
    from confide.tasks.registry import get_task

    try:
        config = TaskConfig.model_validate(card.task)
    except (ValidationError, ValueError) as error:
        raise ModelFileError(f"the model's task cannot be built here: {error}") from None
    task = get_task(config.name)
    return task.build_model(config, shape=tuple(card.input_shape), classes=card.classes, seed=0)


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Load `state` into `model`, every name and shape matching, or ModelFileError."""
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise ModelFileError(f"{what}: its weights do not fit the model: {detail}") from None


def load_model(path: Path) -> tuple[nn.Module, ModelCard]:
    """The model saved at `path` (weights file, card or folder), ready to score, and its card."""
    card = read_card(path)
    state = read_weights(path, card)
    model = build_architecture(card)
    load_into(model, state, what=str(path))
    model.eval()
    return model, card


def provenance(
    results: Results, commitments: Mapping[str, str | None] | None = None
) -> PrivacyProvenance:
    """The privacy provenance of a run's model, from its results (and, by institution id,
    the data commitments its institutions reported)."""
    commitments = commitments or {}
    central = results.privacy.institution_level
    return PrivacyProvenance(
        dp=results.dp,
        accountant=SAMPLE_ACCOUNTANTS.get(results.privacy.accountant or "", None),
        delta=results.final.delta,
        epsilon_max=results.final.epsilon_max,
        institutions=[
            InstitutionProvenance.model_validate(row, from_attributes=True).model_copy(
                update={"data_commitment": commitments.get(str(row.id))}
            )
            for row in results.institutions
        ],
        institution_level=(
            CentralProvenance(epsilon=central.epsilon, delta=central.delta) if central else None
        ),
        statement=results.privacy.statement,
    )


def lineage_of(parent: ModelCard | None, source: str | None) -> list[Ancestor]:
    """The lineage of a model continued from `parent` (named `source`): the parent, then the
    parent's own lineage."""
    if parent is None or source is None:
        return []
    ancestor = Ancestor(
        sha256=parent.weights.sha256, source=source, run=parent.run, privacy=parent.privacy
    )
    return [ancestor, *parent.lineage]


def check_continues(
    card: ModelCard,
    job: JobConfig,
    *,
    what: str,
    shape: tuple[int, ...] | None = None,
    labels: list[str] | None = None,
) -> None:
    """Refuse to start `job` from the model `card` describes unless it is the same task and
    architecture and, where known (`shape`, `labels`: the coordinator's test set), the same
    inputs and classes in the same order."""
    wanted = job.task.model_dump(mode="json", exclude_none=True)
    for key in ("name", "model", "options", "fix_model"):
        if card.task.get(key) != wanted.get(key):
            raise ModelFileError(
                f"{what}: the model was trained with task.{key} = {card.task.get(key)!r}, "
                f"this job has {wanted.get(key)!r}; a model continues only with its own task "
                "and architecture"
            )
    if shape is not None and list(shape) != card.input_shape:
        raise ModelFileError(
            f"{what}: the model takes inputs of shape {card.input_shape}, this job's data has "
            f"{list(shape)}"
        )
    if labels is not None and labels != card.labels:
        raise ModelFileError(
            f"{what}: the model's classes are {card.labels}, this job's are {labels}: output k "
            "would mean another class"
        )


def lineage_bound(privacy: PrivacyProvenance, lineage: list[Ancestor]) -> ModelBound:
    """`ModelBound` of a model whose run has `privacy` and which continues `lineage`.

    Valid when each record stays at one institution's ledger across the lineage: a deployed
    institution's ledger holds its own data, and a simulation continues a simulated model only
    on the ledgers that recorded it (confide.simulations.engine.starting_model)."""
    runs = [privacy, *(ancestor.privacy for ancestor in lineage)]
    sample: float | Literal["unbounded"] = 0.0
    deltas = [0.0]
    for run in runs:
        if not run.dp:
            sample = UNBOUNDED
        for row in run.institutions:
            spent = row.dataset_epsilon if row.dataset_epsilon is not None else row.epsilon
            if spent == UNBOUNDED or (isinstance(spent, float) and math.isinf(spent)):
                sample = UNBOUNDED
            elif spent is not None and sample != UNBOUNDED:
                sample = max(float(sample), float(spent))
            deltas += [d for d in (row.dataset_delta, row.delta) if d is not None]
    central = _composed_central([run.institution_level for run in runs])
    return ModelBound(
        sample_epsilon=sample,
        sample_delta=max(deltas) if any(run.dp for run in runs) else None,
        institution_level_epsilon=central[0] if central else None,
        institution_level_delta=central[1] if central else None,
    )


def _composed_central(
    levels: list[CentralProvenance | None],
) -> tuple[float | Literal["unbounded"], float] | None:
    """Central DP over runs by basic composition (epsilons and deltas add up: valid for any
    (epsilon, delta)-DP mechanisms run one after another, adaptively)."""
    if all(level is None for level in levels):
        return None
    epsilon, delta = 0.0, 0.0
    for level in levels:
        if level is None or level.epsilon is None:
            return UNBOUNDED, 1.0
        epsilon += level.epsilon
        delta += level.delta
    return epsilon, delta


def model_for_run(
    history: JobHistory,
    results: Results,
    *,
    job: JobConfig,
    kind: Literal["simulation", "deployment"],
    run: str,
    lineage: list[Ancestor],
    ledgers: str | None = None,
) -> tuple[ModelCard, bytes] | None:
    """(card, weights) of a finished run's global model (None if no model was recorded);
    `results` are the run's results.json, from which its metrics and provenance come; `run`
    names the run (a deployed run's id, a simulation's results folder)."""
    final = history.model
    if final is None:
        return None
    made_by = ModelRun(
        kind=kind,
        name=results.scenario,
        run=run,
        round=final.round,
        rounds_planned=job.federation.rounds,
        stopped=results.stopped,
        seed=job.seed,
        ledgers=ledgers,
    )
    state = final.arrays.to_torch_state_dict()
    data = encode_weights(state)
    privacy = provenance(
        results, {key: spend.data_commitment for key, spend in history.institutions.items()}
    )
    card = ModelCard(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        task=card_task(job.task),
        data=job.data.model_dump(mode="json"),
        test_set=final.test_set,
        input_shape=list(final.input_shape),
        classes=len(final.labels),
        labels=list(final.labels),
        weights=weights_info(data, state),
        metrics=dict(results.final.metrics),
        run=made_by,
        privacy=privacy,
        lineage=lineage,
        bound=lineage_bound(privacy, lineage),
    )
    return card, data


def card_task(task: TaskConfig) -> dict[str, Any]:
    """A task's table as a card holds it: a data file named, not located (the card travels,
    the coordinator's paths stay)."""
    dumped = task.model_dump(mode="json", exclude_none=True)
    return dumped | ({"path": task.path.name} if task.path is not None else {})


def fingerprint_test_set(test: Dataset) -> str:
    """SHA-256 of a test set's examples (as float32) and labels (as int64), each with its
    shape: what the coordinator scored a model on, and what `predict` checks it scores again."""
    digest = hashlib.sha256()
    for array in (np.ascontiguousarray(test.x, np.float32), np.ascontiguousarray(test.y, np.int64)):
        digest.update(repr(array.shape).encode())
        digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()
