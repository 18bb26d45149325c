"""The federated layout of one dataset: a held-out test set, then one shard per institution,
each cut into a training part and a local validation part.

Everything is a pure function of (task, data config, institutions, seed), so a coordinator and
every simulated institution derive the same layout without exchanging data. Each cut draws
from its own stream derived from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from confide.common.seeding import derive_seed
from confide.tasks.config import DataConfig, TaskConfig
from confide.tasks.datasets import Dataset
from confide.tasks.partition import PartitionError, PartitionRow, label_table, partition_indices


@dataclass(frozen=True)
class InstitutionData:
    """One institution's local data: what it trains on and what it validates on."""

    train: Dataset
    validation: Dataset


@dataclass(frozen=True)
class FederatedSplit:
    test: Dataset
    institutions: list[InstitutionData]
    table: list[PartitionRow]  # partitions.json

    @property
    def classes(self) -> int:
        return self.test.classes

    @property
    def features(self) -> int:
        return self.test.features

    @property
    def shape(self) -> tuple[int, ...]:
        """One example's shape, what the model is built for: (d,) or (C, H, W)."""
        return self.test.shape


def _split(data: Dataset, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices; stratified when every class can appear on both sides."""
    indices = np.arange(len(data))
    held_size = int(np.ceil(fraction * len(data)))
    if held_size >= len(data):
        raise PartitionError(
            f"{what}: {fraction:g} of {len(data)} examples leaves nothing to keep; "
            "lower the fraction or use more data"
        )
    counts = np.bincount(data.y, minlength=data.classes)
    present = int((counts > 0).sum())
    stratified = counts[counts > 0].min() >= 2 and min(held_size, len(data) - held_size) >= present
    from sklearn.model_selection import train_test_split  # lazily: 0.7 s to import

    keep, held = train_test_split(
        indices, test_size=held_size, random_state=seed, stratify=data.y if stratified else None
    )
    return np.sort(keep), np.sort(held)


def split_test(task: TaskConfig, data: DataConfig, seed: int) -> tuple[Dataset, Dataset]:
    """(pool for institutions, held-out test set) of the task's dataset."""
    # Imported here: the registry imports torch, and `confide-client start` (which checks an
    # institution's data with `training_size`) runs without it (a few hundred MiB less per
    # institution on a host).
    from confide.tasks.registry import get_task

    full = get_task(task.name).load(task, seed)
    if len(full) < 4:
        raise PartitionError(f"task '{task.name}' has only {len(full)} examples")
    pool, test = _split(full, data.test_fraction, derive_seed(seed, "test"), "data.test_fraction")
    return full.subset(pool), full.subset(test)


def federate(task: TaskConfig, data: DataConfig, *, institutions: int, seed: int) -> FederatedSplit:
    """Split the task's data into a test set and `institutions` local datasets."""
    pool, test = split_test(task, data, seed)
    parts = partition_indices(
        pool.y, institutions, data.partition, seed=derive_seed(seed, "partition")
    )
    local = [
        split_validation(
            pool.subset(part),
            data.validation_fraction,
            seed=derive_seed(seed, "validation", index),
            what="data.validation_fraction",
        )
        for index, part in enumerate(parts)
    ]
    return FederatedSplit(test, local, label_table(pool.y, parts, pool.classes))


def validation_indices(
    shard: Dataset, fraction: float, *, seed: int, what: str = "validation_fraction"
) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) indices of one institution's data: none held out if `fraction`
    is 0 or the shard has fewer than two examples; `what` names the setting in errors."""
    if fraction > 0 and len(shard) >= 2:
        return _split(shard, fraction, seed, what)
    return np.arange(len(shard)), np.arange(0)


def training_size(examples: int, fraction: float) -> int:
    """How many of `examples` stay for training once `validation_indices` holds `fraction`
    out (its ceil(fraction * n), none held out below two examples)."""
    if fraction > 0 and examples >= 2:
        return examples - int(np.ceil(fraction * examples))
    return examples


def split_validation(
    shard: Dataset, fraction: float, *, seed: int, what: str = "validation_fraction"
) -> InstitutionData:
    """One institution's data cut into training and local validation."""
    train, validation = validation_indices(shard, fraction, seed=seed, what=what)
    return InstitutionData(shard.subset(train), shard.subset(validation))
