"""A job's checkpoint: what the coordinator needs to continue a job after its last completed
round, written after every round, encrypted at rest.

What it holds (`Checkpoint`): the job (its JSON and hash: a checkpoint resumes only the job
that wrote it), the job's run identity (the Flower run that started it, which institutions key
their ledger entries by, `RoundInstructions.run`), the last completed round, the global model
after it (safetensors), the job's history (every round so far, the institutions' spends, the
refused replies, central DP's releases), the roster's exclusions, central DP's noise seed in a
simulation, the seconds spent so far and every earlier resumption.

How it is kept (`CheckpointStore`): one file, replaced atomically after each round, holding

    MAGIC | 12-byte nonce | AES-256-GCM(key, nonce, checkpoint JSON, associated data)

with a fresh random nonce per write and associated data binding the format and the run
identity (a file copied onto another run's name does not open). The 32-byte key is random, in
a file of mode 0600 beside the coordinator's other secrets (deployment: STATE/checkpoint.key;
simulation: the run folder's checkpoint.key); it is created on first use and never logged.
Reading checks everything: a missing file, another key, a truncated or altered file, or a
checkpoint of another run is a `CheckpointError` that says which.

In deployment the checkpoint is STATE/checkpoints/run-<run>.ckpt; in a simulation,
results/<run>/checkpoint.ckpt. Either is deleted once the job's results are written: a
finished job is not resumed (its results.json says how it ended).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flwr.app import Array, ArrayRecord
from flwr.common import log
from pydantic import Field, ValidationError

from confide.common.config import StrictModel
from confide.common.errors import CheckpointError
from confide.common.files import write_atomic
from confide.server.central_dp import CentralDP
from confide.server.history import JobHistory, Resumption
from confide.server.job import JobConfig
from confide.server.sampling import Roster
from confide.server.strategy import ConfideStrategy

FORMAT: Literal[1] = 1
MAGIC = b"confide-checkpoint\x00v1\x00"
NONCE_BYTES = 12
KEY_BYTES = 32
SUFFIX = ".ckpt"


def job_json(job: JobConfig) -> str:
    """The job as the checkpoint keeps it (and hashes it): its canonical JSON."""
    return job.model_dump_json(exclude_none=True)


def job_sha256(job: JobConfig) -> str:
    return hashlib.sha256(job_json(job).encode()).hexdigest()


class RosterState(StrictModel):
    """The institutions that sit out the rest of the job (confide.server.sampling.Roster)."""

    refusing: dict[str, str] = Field(default_factory=dict)
    unevaluated: list[str] = Field(default_factory=list)


class Checkpoint(StrictModel):
    """The state of a job after its round `round` (see the module docstring)."""

    format: Literal[1] = FORMAT
    name: str
    run: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    job: str  # JobConfig JSON (`job_json`)
    job_sha256: str
    scenario: str | None = None  # a simulation's whole scenario (ScenarioConfig JSON)
    ledgers: str | None = None  # a simulation's virtual institutions' ledgers
    round: int = Field(ge=0)  # 0: none recorded yet (a checkpoint of releases only)
    names: list[str]  # the model's arrays, in order
    model: str  # the global model after `round`: safetensors, base64
    history: JobHistory
    roster: RosterState = RosterState()
    central_releases: list[int] = Field(default_factory=list)
    # Central DP releases made after `round` whose round was never recorded (the coordinator
    # died first): institutions may hold them, so a resumed job counts them (they are drawn
    # with fresh noise in deployment; a simulation's seeded noise repeats them exactly).
    unrecorded_releases: list[int] = Field(default_factory=list)
    noise_seed: int | None = None  # central DP's in a simulation (deployment: none)
    seconds: float = Field(default=0.0, ge=0.0)

    def job_config(self) -> JobConfig:
        """The job this checkpoint continues (CheckpointError if its hash does not match)."""
        if hashlib.sha256(self.job.encode()).hexdigest() != self.job_sha256:
            raise CheckpointError(
                f"the checkpoint of run {self.run} holds a job that fails its hash"
            )
        return JobConfig.model_validate_json(self.job)

    def check_job(self, job: JobConfig) -> None:
        """CheckpointError unless `job` is the job this checkpoint was written by."""
        if job_sha256(job) != self.job_sha256:
            raise CheckpointError(
                f"the checkpoint of run {self.run} was written by another job: a job is "
                "resumed with the configuration it started with"
            )

    def arrays(self) -> ArrayRecord:
        """The global model after `round`, exactly as it was (names, order, dtypes, bits)."""
        from safetensors.numpy import load

        loaded = load(base64.b64decode(self.model))
        return ArrayRecord(OrderedDict((name, Array(loaded[name])) for name in self.names))


def encode_arrays(arrays: ArrayRecord) -> tuple[list[str], str]:
    """(array names in order, base64 safetensors of the arrays)."""
    from safetensors.numpy import save

    names = list(arrays.keys())
    data = save({name: arrays[name].numpy() for name in names})
    return names, base64.b64encode(data).decode()


def _associated(run: str) -> bytes:
    """What every ciphertext is bound to: the format and the job's run identity."""
    return MAGIC + f"run={run}".encode()


class CheckpointStore:
    """Where one job's checkpoint lives (`path`) and the key it is encrypted with (`key`)."""

    def __init__(self, path: Path, key: Path) -> None:
        self.path = Path(path)
        self.key = Path(key)

    @classmethod
    def for_run(cls, state: Path, run: str) -> CheckpointStore:
        """Deployment: STATE/checkpoints/run-<run>.ckpt, with the key STATE/checkpoint.key."""
        return cls(
            Path(state) / "checkpoints" / f"run-{run}{SUFFIX}", Path(state) / "checkpoint.key"
        )

    @classmethod
    def in_folder(cls, folder: Path) -> CheckpointStore:
        """Simulation: the run folder's checkpoint.ckpt, with checkpoint.key beside it."""
        return cls(Path(folder) / f"checkpoint{SUFFIX}", Path(folder) / "checkpoint.key")

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, checkpoint: Checkpoint) -> None:
        """Encrypt and write `checkpoint` atomically (mode 0600), replacing the last one."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = AESGCM(self._key(create=True)).encrypt(
            nonce, checkpoint.model_dump_json().encode(), _associated(checkpoint.run)
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, MAGIC + nonce + sealed, mode=0o600)

    def load(self, run: str) -> Checkpoint:
        """The checkpoint of run `run`, decrypted and validated; CheckpointError if there is
        none, or it is of another run, encrypted with another key, truncated or altered."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint of run {run} ({self.path})") from None
        except OSError as error:
            raise CheckpointError(f"the checkpoint {self.path} cannot be read: {error}") from None
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + NONCE_BYTES + 16:
            raise CheckpointError(f"{self.path} is not a confide checkpoint, or is truncated")
        nonce = data[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
        try:
            plain = AESGCM(self._key(create=False)).decrypt(
                nonce, data[len(MAGIC) + NONCE_BYTES :], _associated(run)
            )
        except InvalidTag:
            raise CheckpointError(
                f"{self.path} does not open with the key {self.key} as the checkpoint of run "
                f"{run}: it was altered or truncated, written with another key, or is another "
                "run's; it is not used"
            ) from None
        try:
            checkpoint = Checkpoint.model_validate_json(plain)
        except ValidationError as error:
            raise CheckpointError(f"{self.path} holds no valid checkpoint: {error}") from None
        if checkpoint.run != run:  # bound by the associated data too; kept explicit
            raise CheckpointError(f"{self.path} is the checkpoint of run {checkpoint.run}")
        return checkpoint

    def remove(self) -> None:
        """Delete the checkpoint (the job finished); the key stays for other jobs."""
        self.path.unlink(missing_ok=True)

    def _key(self, *, create: bool) -> bytes:
        """The 32-byte key: read, or (when writing) created at random with mode 0600."""
        try:
            key = self.key.read_bytes()
        except FileNotFoundError:
            if not create:
                raise CheckpointError(
                    f"the checkpoint key {self.key} is missing: the checkpoint cannot be read"
                ) from None
            key = _create_key(self.key)
        except OSError as error:
            raise CheckpointError(
                f"the checkpoint key {self.key} cannot be read: {error}"
            ) from None
        if len(key) != KEY_BYTES:
            raise CheckpointError(f"the checkpoint key {self.key} is not {KEY_BYTES} bytes")
        return key


def _create_key(path: Path) -> bytes:
    """A new random key at `path` (mode 0600 from the first byte), unless another process
    created one first: then that one (linking, unlike renaming, never replaces a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(handle, 0o600)
        with os.fdopen(handle, "wb") as stream:
            stream.write(key)
            stream.flush()
            os.fsync(stream.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return path.read_bytes()
        return key
    finally:
        Path(temporary).unlink(missing_ok=True)


@dataclass(frozen=True)
class Checkpointing:
    """How a run of a job checkpoints: into `store`, under the job's run identity `run`;
    `this_run` is the Flower run doing the work (the same as `run` unless resumed), `resume`
    the checkpoint it continues, if any; `scenario` and `ledgers` a simulation's."""

    store: CheckpointStore
    run: str
    this_run: str
    resume: Checkpoint | None = None
    scenario: str | None = None
    ledgers: str | None = None


def restore(checkpoint: Checkpoint, *, history: JobHistory, strategy: ConfideStrategy) -> int:
    """Put the job's state after the checkpoint's round back: the history (every round once,
    spends, refusals, central releases, resumptions; `history` is filled in place, its
    holders keep it), the roster's exclusions and central DP's releases (its epsilon goes on
    from them). Returns that round."""
    restored = checkpoint.history.model_copy(deep=True)
    for field in JobHistory.model_fields:
        if field != "model":
            setattr(history, field, getattr(restored, field))
    # Releases the first run made but never recorded count as made: in the record and in
    # central DP's account (its epsilon goes on from all of them).
    history.central_releases.extend(checkpoint.unrecorded_releases)
    roster: Roster = strategy.roster
    roster.refusing.update(checkpoint.roster.refusing)
    roster.unevaluated.update(checkpoint.roster.unevaluated)
    if isinstance(strategy.aggregation, CentralDP):
        strategy.aggregation.releases = list(history.central_releases)
    return checkpoint.round


class Checkpointer:
    """Called once each round is recorded in the history: writes the job's checkpoint (a
    checkpoint that cannot be written is logged; the job goes on, without a way back to that
    round)."""

    def __init__(
        self,
        checkpointing: Checkpointing,
        *,
        job: JobConfig,
        name: str,
        history: JobHistory,
        strategy: ConfideStrategy,
        noise_seed: int | None,
        initial: ArrayRecord,
    ) -> None:
        self.checkpointing = checkpointing
        self.job = job
        self.name = name
        self.history = history
        self.strategy = strategy
        self.noise_seed = noise_seed
        resume = checkpointing.resume
        self.before = resume.seconds if resume is not None else 0.0
        self.started = time.perf_counter()
        self.initial = initial
        # The last checkpoint written (or resumed): a release charges itself on top of it.
        self.last: Checkpoint | None = resume
        if isinstance(strategy.aggregation, CentralDP):
            strategy.aggregation.on_release = self.released

    def seconds(self) -> float:
        """The job's seconds so far, over every run of it."""
        return self.before + time.perf_counter() - self.started

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None:
        self._save(self._checkpoint(server_round, arrays, self.history), server_round)

    def released(self, asked: int) -> None:
        """Charge a central DP release the moment it is made, before the released model
        leaves the coordinator: the last checkpoint is written again with the release among
        its `unrecorded_releases`, so that a coordinator that dies before the round is
        recorded resumes with it counted. Not with a simulation's seeded noise: there a
        resumed run repeats the same release exactly, which reveals nothing more."""
        if self.noise_seed is not None:
            return
        base = self.last
        if base is None:
            if self.history.central_releases or self.checkpointing.resume is not None:
                # A checkpoint failed to be written and was removed: none can be sound now.
                return
            # The job's first release: a checkpoint of its starting point.
            start = JobHistory(initial_metrics=dict(self.history.initial_metrics))
            base = self._checkpoint(0, self.initial, start)
        pending = base.model_copy(
            update={
                "unrecorded_releases": [*base.unrecorded_releases, asked],
                "seconds": self.seconds(),
            }
        )
        self._save(pending, base.round)

    def _checkpoint(
        self, server_round: int, arrays: ArrayRecord, history: JobHistory
    ) -> Checkpoint:
        names, model = encode_arrays(arrays)
        roster = self.strategy.roster
        checkpointing = self.checkpointing
        return Checkpoint(
            name=self.name,
            run=checkpointing.run,
            job=job_json(self.job),
            job_sha256=job_sha256(self.job),
            scenario=checkpointing.scenario,
            ledgers=checkpointing.ledgers,
            round=server_round,
            names=names,
            model=model,
            history=history,
            roster=RosterState(
                refusing=dict(roster.refusing), unevaluated=sorted(roster.unevaluated)
            ),
            central_releases=list(history.central_releases),
            noise_seed=self.noise_seed,
            seconds=self.seconds(),
        )

    def _save(self, checkpoint: Checkpoint, server_round: int) -> None:
        """Write `checkpoint`; if it cannot be written, delete the last one rather than leave
        it behind: resuming from it would forget what happened since (releases included)."""
        store = self.checkpointing.store
        try:
            store.save(checkpoint)
        except (OSError, CheckpointError) as error:
            # The job goes on: a full disk costs the ability to resume, not the job itself.
            log(WARNING, "round %d was not checkpointed: %s", server_round, error)
            try:
                store.remove()
            except OSError as removal:
                log(WARNING, "the last checkpoint %s could not be removed: %s", store.path, removal)
            self.last = None
            return
        self.last = checkpoint


def resumption(checkpoint: Checkpoint, this_run: str) -> Resumption:
    return Resumption(from_round=checkpoint.round + 1, run=this_run)
