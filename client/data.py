"""Who an institution is and where its local data comes from.

A `LocalInstitution` is what one node knows about itself: its name, its device, its privacy
limits, its ledger and how to load (and fingerprint) its data for a job. A resolver maps a
Flower `Context` to it:

- `SimulatedInstitutions`: virtual institution `partition-id` of a partitioned dataset (the
  resolver is small and picklable because Ray ships the ClientApp with every message; the data
  itself is built once per worker process), with its ledger in `<state>/institution-<i>`;
- `deployed_institution`: a real institution, from its own state directory (node config key
  `confide-dir`), whose settings file names its data, device and limits, and which holds its
  ledger.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict

from confide.client.institution import STATE_DIR_KEY
from confide.common.config import unflatten
from confide.common.seeding import derive_seed
from confide.privacy.instructions import RoundInstructions
from confide.privacy.ledger import DEFAULT_DATASET, fingerprint_bytes, fingerprint_file
from confide.privacy.mechanism import default_declared_size
from confide.privacy.policy import PrivacyPolicy
from confide.privacy.trainer import NoiseSource
from confide.tasks.config import DataConfig, TaskConfig
from confide.tasks.datasets import DatasetError, describe_shape, load_file
from confide.tasks.splits import FederatedSplit, InstitutionData, federate, validation_indices

SPLIT_KEY = "confide.data.validation"
FINGERPRINT_KEY = "confide.data.fingerprint"


@dataclass(frozen=True)
class LocalInstitution:
    """One institution as its ClientApp sees it.

    `ledger` is the folder of its privacy ledger (every DP-SGD round ever run on `dataset`,
    identified by `fingerprint()`, a content hash); None keeps no ledger (a bare
    `flwr run .` simulation). `policy` holds its limits (None: recorded, not enforced).
    `declared_examples` is the size it publishes (confide.privacy.mechanism): the sampling
    rate, steps, noise, divisor and the update's weight follow from it, never from the data's
    actual size; None has none declared (a deployed institution then refuses to train).
    `noise_source` is where its DP-SGD noise comes from: "csprng" (the OS CSPRNG) or "torch"
    (PyTorch's generator, seeded per round).
    `single_thread` is for simulation, where institutions share the machine's cores.
    """

    name: str
    device: str
    load: Callable[[RoundInstructions], InstitutionData]
    fingerprint: Callable[[], str]
    declared_examples: int | None
    policy: PrivacyPolicy | None = None
    ledger: Path | None = None
    dataset: str = DEFAULT_DATASET
    noise_source: NoiseSource = "torch"
    single_thread: bool = False


Resolver = Callable[[Context], LocalInstitution]


def clear_split_cache() -> None:
    """Forget the cached splits (`_federated`): a benchmark that runs several simulations in
    one process measures each one's memory from the same start."""
    _federated.cache_clear()


@lru_cache(maxsize=4)
def _federated(task_json: str, data_json: str, institutions: int, seed: int) -> FederatedSplit:
    return federate(
        TaskConfig.model_validate_json(task_json),
        DataConfig.model_validate_json(data_json),
        institutions=institutions,
        seed=seed,
    )


@dataclass(frozen=True)
class SimulatedInstitutions:
    """Virtual institution `partition-id` (from the node config) of a partitioned dataset.

    With `state`, institution i keeps its ledger in `state/institution-<i>` and, with
    `policy`, enforces those limits like a deployed institution. Institution i declares
    `declared[i]` examples (`declared` None: its partition's training size rounded to two
    significant figures, what a deployed institution's `join` declares by default). Noise
    is PyTorch's generator, seeded from the scenario seed so that runs repeat (documented in
    every simulated privacy report).
    """

    task: TaskConfig
    data: DataConfig
    institutions: int
    seed: int
    device: str = "cpu"
    state: Path | None = None
    policy: PrivacyPolicy | None = None
    declared: tuple[int, ...] | None = None

    def split(self) -> FederatedSplit:
        return _federated(
            self.task.model_dump_json(), self.data.model_dump_json(), self.institutions, self.seed
        )

    def __call__(self, context: Context) -> LocalInstitution:
        index = int(context.node_config["partition-id"])
        local = self.split().institutions[index]
        return LocalInstitution(
            str(index),
            self.device,
            lambda _: local,
            lambda: self.fingerprint(index),
            self.declared_size(index),
            policy=self.policy,
            ledger=None if self.state is None else self.state / f"institution-{index}",
            single_thread=True,
        )

    def fingerprint(self, index: int) -> str:
        """The content hash of virtual institution `index`'s data (its ledger's dataset)."""
        local = self.split().institutions[index]
        parts = (local.train, local.validation)
        return fingerprint_bytes(*(a.tobytes() for part in parts for a in (part.x, part.y)))

    def declared_size(self, index: int) -> int:
        """The size virtual institution `index` publishes."""
        if self.declared is not None:
            return self.declared[index]
        return default_declared_size(len(self.split().institutions[index].train))

    @classmethod
    def from_context(cls, context: Context) -> SimulatedInstitutions:
        """For `flwr run`: the layout from run_config, the count from the node config."""
        tree = unflatten(dict(context.run_config))
        return cls(
            TaskConfig.model_validate(tree.get("task", {})),
            DataConfig.model_validate(tree.get("data", {})),
            int(context.node_config["num-partitions"]),
            int(tree.get("seed", 0)),
        )


def local_data(
    path: Path,
    *,
    label_column: str,
    validation_fraction: float,
    instructions: RoundInstructions,
    institution: str,
    state: RecordDict | None = None,
) -> InstitutionData:
    """The institution's file encoded with the job's class names, cut into training and
    validation parts (the institution's own `validation_fraction`, seeded by job and name).

    The cut is kept in the node's `state` for the rest of the job: computing it imports
    scikit-learn (seconds), and a deployed ClientApp is a new process for every message.
    """
    expected = instructions.input_shape()
    if instructions.labels is None or expected is None:
        raise DatasetError("the job does not name the model's input shape and classes")
    path = Path(path)
    mtime = _modified(path)
    full = load_file(path, label_column, tuple(instructions.labels))
    if full.shape != expected:
        raise DatasetError(
            f"{path}: {describe_shape(full.shape)}, the job's model takes "
            f"{describe_shape(expected)}"
        )
    seed = derive_seed(instructions.seed, "validation", institution)
    key = f"{path}|{mtime}|{len(full)}|{validation_fraction}|{seed}"
    cached = state.get(SPLIT_KEY) if state is not None else None
    kept = cached.get("validation") if isinstance(cached, ConfigRecord) else None
    if isinstance(cached, ConfigRecord) and cached.get("key") == key and isinstance(kept, bytes):
        held = np.frombuffer(kept, dtype=np.int64)
        keep = np.setdiff1d(np.arange(len(full)), held)
    else:
        keep, held = validation_indices(full, validation_fraction, seed=seed)
        if state is not None:
            state[SPLIT_KEY] = ConfigRecord(
                {"key": key, "validation": np.asarray(held, dtype=np.int64).tobytes()}
            )
    return InstitutionData(full.subset(keep), full.subset(held))


def deployed_institution(context: Context) -> LocalInstitution:
    """The institution whose state directory the SuperNode was started with."""
    from confide.client.institution import InstitutionDir, InstitutionError

    try:
        root = context.node_config[STATE_DIR_KEY]
    except KeyError:
        raise InstitutionError(
            f"the SuperNode was started without node config '{STATE_DIR_KEY}'; "
            "start it with `confide-client start`"
        ) from None
    config = InstitutionDir(Path(str(root))).load()
    return LocalInstitution(
        config.name,
        config.device,
        lambda instructions: local_data(
            config.data,
            label_column=config.label_column,
            validation_fraction=config.validation_fraction,
            instructions=instructions,
            institution=config.name,
            state=context.state,
        ),
        lambda: file_fingerprint(config.data, context.state),
        config.declared_examples,
        config.privacy,
        ledger=Path(str(root)),
        dataset=config.dataset,
        noise_source=config.noise_generator,
    )


def _modified(path: Path) -> str:
    """When and how big the data was last changed: the file's size and modification time, or
    for a folder of images every file's name, size and time (a folder's own time changes
    only when an entry is added or removed)."""
    try:
        if not path.is_dir():
            status = path.stat()
            return f"{status.st_size}|{status.st_mtime_ns}"
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            status = file.stat()
            name = file.relative_to(path).as_posix()
            digest.update(f"{name}|{status.st_size}|{status.st_mtime_ns}\n".encode())
        return digest.hexdigest()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read the institution's data: {error}") from None


def file_fingerprint(path: Path, state: RecordDict) -> str:
    """The data's content hash, kept in the node's state while the data is unchanged
    (size and modification time): hashing a large file every round would cost seconds."""
    key = f"{path}|{_modified(Path(path))}"
    cached = state.get(FINGERPRINT_KEY)
    if isinstance(cached, ConfigRecord) and cached.get("key") == key:
        return str(cached["fingerprint"])
    fingerprint = fingerprint_file(path)
    state[FINGERPRINT_KEY] = ConfigRecord({"key": key, "fingerprint": fingerprint})
    return fingerprint


def resolve(context: Context) -> LocalInstitution:
    """A simulated institution if the node config says which partition it is, else the
    deployed institution whose state directory the node config names."""
    if "partition-id" in context.node_config and STATE_DIR_KEY not in context.node_config:
        return SimulatedInstitutions.from_context(context)(context)
    return deployed_institution(context)
