"""What is trained: datasets, models, partitions and metrics.

A *task* is a dataset loader, a model builder and the metrics that judge it. Nothing in this
package knows about Flower's runtime or Opacus: it is plain NumPy, scikit-learn and PyTorch, so
the same task runs in simulation, in deployment and in a notebook.
"""

from confide.tasks.config import DataConfig, ModelConfig, PartitionConfig, TaskConfig
from confide.tasks.datasets import Dataset, DatasetError
from confide.tasks.metrics import evaluate
from confide.tasks.registry import Task, get_task, list_tasks, register_task

__all__ = [
    "DataConfig",
    "Dataset",
    "DatasetError",
    "ModelConfig",
    "PartitionConfig",
    "Task",
    "TaskConfig",
    "evaluate",
    "get_task",
    "list_tasks",
    "register_task",
]
