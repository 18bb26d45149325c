"""Where an institution's local data comes from.

A data source is a small, picklable callable `(context) -> (institution id, InstitutionData)`.
Simulation gives every virtual institution its shard of a bundled or user dataset; a deployed
institution (a later capability) reads its own file. Sources are cheap to pickle because Ray
ships the ClientApp with every message; the data itself is built once per worker process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from flwr.app import Context

from confide.tasks.config import DataConfig, TaskConfig, unflatten
from confide.tasks.splits import FederatedSplit, InstitutionData, federate


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

    def split(self) -> FederatedSplit:
        return _federated(
            self.task.model_dump_json(), self.data.model_dump_json(), self.institutions, self.seed
        )

    def __call__(self, context: Context) -> tuple[str, InstitutionData]:
        index = int(context.node_config["partition-id"])
        return str(index), self.split().institutions[index]

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
