"""Who an institution is and where its local data comes from.

A `LocalInstitution` is what one node knows about itself: its name, its device, its privacy
limits and how to load its data for a job. A resolver maps a Flower `Context` to it:

- `SimulatedInstitutions`: virtual institution `partition-id` of a partitioned dataset (the
  resolver is small and picklable because Ray ships the ClientApp with every message; the data
  itself is built once per worker process);
- `deployed_institution`: a real institution, from its own state directory (node config key
  `confide-dir`), whose settings file names its data, device and limits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from flwr.app import Context

from confide.privacy.instructions import RoundInstructions
from confide.privacy.policy import LocalPolicy
from confide.tasks.config import DataConfig, TaskConfig, unflatten
from confide.tasks.datasets import Dataset, DatasetError, load_file
from confide.tasks.seeding import derive_seed
from confide.tasks.splits import FederatedSplit, InstitutionData, federate, split_validation

# The node config key a deployed SuperNode is started with (see `confide-client start`).
STATE_DIR_KEY = "confide-dir"


@dataclass(frozen=True)
class LocalInstitution:
    """One institution as its ClientApp sees it; `policy` is None in simulation."""

    name: str
    device: str
    load: Callable[[RoundInstructions], InstitutionData]
    policy: LocalPolicy | None = None


Resolver = Callable[[Context], LocalInstitution]


@lru_cache(maxsize=4)
def _federated(task_json: str, data_json: str, institutions: int, seed: int) -> FederatedSplit:
    return federate(
        TaskConfig.model_validate_json(task_json),
        DataConfig.model_validate_json(data_json),
        institutions,
        seed,
    )


@dataclass(frozen=True)
class SimulatedInstitutions:
    """Virtual institution `partition-id` (from the node config) of a partitioned dataset."""

    task: TaskConfig
    data: DataConfig
    institutions: int
    seed: int
    device: str = "cpu"

    def split(self) -> FederatedSplit:
        return _federated(
            self.task.model_dump_json(), self.data.model_dump_json(), self.institutions, self.seed
        )

    def __call__(self, context: Context) -> LocalInstitution:
        index = int(context.node_config["partition-id"])
        local = self.split().institutions[index]
        return LocalInstitution(str(index), self.device, lambda _: local)

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


@lru_cache(maxsize=4)
def _local_file(path: Path, label_column: str, labels: tuple[str, ...], mtime_ns: int) -> Dataset:
    # mtime in the key: a file the institution replaces between jobs is read again.
    return load_file(path, label_column, labels)


def local_data(
    path: Path,
    label_column: str,
    validation_fraction: float,
    instructions: RoundInstructions,
    institution: str,
) -> InstitutionData:
    """The institution's file encoded with the job's class names, cut into training and
    validation parts (the institution's own `validation_fraction`, seeded by job and name).
    """
    if instructions.labels is None or instructions.features is None:
        raise DatasetError("the job does not name the model's features and classes")
    path = Path(path)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as error:
        raise DatasetError(f"{path}: cannot read the institution's data: {error}") from None
    full = _local_file(path, label_column, tuple(instructions.labels), mtime)
    if full.features != instructions.features:
        raise DatasetError(
            f"{path}: {full.features} feature columns, the job's model takes "
            f"{instructions.features}"
        )
    seed = derive_seed(instructions.seed, "validation", institution)
    return split_validation(full, validation_fraction, seed)


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
            config.data, config.label_column, config.validation_fraction, instructions, config.name
        ),
        config.privacy,
    )


def resolve(context: Context) -> LocalInstitution:
    """A deployed institution if the node names its state directory, else a simulated one."""
    if STATE_DIR_KEY in context.node_config:
        return deployed_institution(context)
    return SimulatedInstitutions.from_context(context)(context)
