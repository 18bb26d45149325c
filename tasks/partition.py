"""Split a labelled set among institutions: IID, Dirichlet label skew, or label shards.

The non-IID schemes use flwr-datasets' partitioners (`DirichletPartitioner`,
`ShardPartitioner`); IID is a seeded shuffle cut into near-equal parts. Every scheme is a pure
function of (labels, institutions, config, seed).
"""

from __future__ import annotations

import warnings

import numpy as np

from confide.tasks.config import PartitionConfig


class PartitionError(ValueError):
    """The data cannot be split as asked (too few examples, too many institutions...)."""


def partition_indices(
    labels: np.ndarray, institutions: int, config: PartitionConfig, seed: int
) -> list[np.ndarray]:
    """Return one sorted index array per institution; together they cover each index once
    (IID, Dirichlet) or at most once (shards drop an incomplete last shard)."""
    if institutions < 1:
        raise PartitionError("need at least one institution")
    if len(labels) < institutions:
        raise PartitionError(
            f"{len(labels)} examples cannot be split among {institutions} institutions"
        )
    if config.scheme == "iid":
        order = np.random.default_rng(seed).permutation(len(labels))
        parts = np.array_split(order, institutions)
    else:
        parts = _flwr_partitions(labels, institutions, config, seed)
    parts = [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
    empty = [i for i, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise PartitionError(
            f"institution(s) {empty[:5]} received no examples; use fewer institutions or a "
            "less skewed partition"
        )
    return parts


def _flwr_partitions(
    labels: np.ndarray, institutions: int, config: PartitionConfig, seed: int
) -> list[np.ndarray]:
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import DirichletPartitioner, ShardPartitioner

    table = HFDataset.from_dict({"index": np.arange(len(labels)), "label": labels})
    if config.scheme == "dirichlet":
        if config.min_examples * institutions > len(labels):
            raise PartitionError(
                f"dirichlet: min_examples={config.min_examples} x {institutions} institutions "
                f"exceeds the {len(labels)} examples available"
            )
        partitioner = DirichletPartitioner(
            num_partitions=institutions,
            partition_by="label",
            alpha=config.alpha,
            min_partition_size=config.min_examples,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        shards = institutions * config.shards_per_institution
        if shards > len(labels):
            raise PartitionError(
                f"shards: {institutions} institutions x {config.shards_per_institution} shards "
                f"needs at least {shards} examples, have {len(labels)}"
            )
        partitioner = ShardPartitioner(
            num_partitions=institutions,
            partition_by="label",
            num_shards_per_partition=config.shards_per_institution,
            shuffle=True,
            seed=seed,
        )
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():  # each failed draw warns; the final error says it all
            warnings.simplefilter("ignore")
            return [np.asarray(partitioner.load_partition(i)["index"]) for i in range(institutions)]
    except ValueError as error:  # flwr-datasets gives up after too many draws
        raise PartitionError(f"{config.scheme}: {error}") from None


def label_table(
    labels: np.ndarray, parts: list[np.ndarray], classes: int
) -> list[dict[str, int | list[int]]]:
    """Examples and per-label counts of each institution, for display and `partitions.json`."""
    return [
        {
            "institution": i,
            "examples": len(part),
            "labels": np.bincount(labels[part], minlength=classes).tolist(),
        }
        for i, part in enumerate(parts)
    ]
