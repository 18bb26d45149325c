"""Split a labelled set among institutions: IID, Dirichlet label skew, or label shards.

The non-IID schemes follow the algorithms of flwr-datasets' `DirichletPartitioner` and
`ShardPartitioner`, written here over NumPy arrays: the library itself works on Hugging Face
datasets and would add some twenty packages to every install for two functions. Every scheme
is a pure function of (labels, institutions, config, seed).

`PartitionRow` is one institution's line of the split's label table; a simulation writes the
table as `partitions.json` (its JSON Schema: docs/schemas/partitions.json). It lives here, with
the code that computes it, because the table is a property of the split (`FederatedSplit.table`)
that the display shows before any training, not something a run produces.
"""

from __future__ import annotations

import json

import numpy as np
from pydantic import ConfigDict, RootModel

from confide.common.config import StrictModel
from confide.common.errors import PartitionError
from confide.tasks.config import PartitionConfig


def partition_indices(
    labels: np.ndarray, institutions: int, config: PartitionConfig, *, seed: int
) -> list[np.ndarray]:
    """Return one sorted index array per institution; together they cover each index once
    (IID, Dirichlet) or at most once (shards drop an incomplete last shard)."""
    if institutions < 1:
        raise PartitionError("need at least one institution")
    if len(labels) < institutions:
        raise PartitionError(
            f"{len(labels)} examples cannot be split among {institutions} institutions"
        )
    rng = np.random.default_rng(seed)
    if config.scheme == "iid":
        parts = np.array_split(rng.permutation(len(labels)), institutions)
    elif config.scheme == "dirichlet":
        parts = _dirichlet(labels, institutions, config, rng)
    else:
        parts = _shards(labels, institutions, config, rng)
    parts = [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
    empty = [i for i, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise PartitionError(
            f"institution(s) {empty[:5]} received no examples; use fewer institutions or a "
            "less skewed partition"
        )
    return parts


MAX_DIRICHLET_DRAWS = 10


def _dirichlet(
    labels: np.ndarray, institutions: int, config: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label skew (Hsu et al. 2019): each class is split among institutions in proportions
    drawn from Dirichlet(alpha); the draw is repeated until every institution holds at least
    `min_examples` (flwr-datasets' DirichletPartitioner does the same)."""
    if config.min_examples * institutions > len(labels):
        raise PartitionError(
            f"dirichlet: min_examples={config.min_examples} x {institutions} institutions "
            f"exceeds the {len(labels)} examples available"
        )
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(institutions)]
        for members in by_class:
            shares = rng.dirichlet(np.full(institutions, config.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for institution, chunk in enumerate(np.split(members, cuts)):
                parts[institution].append(chunk)
        merged = [np.concatenate(chunks) for chunks in parts]
        if min(len(part) for part in merged) >= config.min_examples:
            return merged
    raise PartitionError(
        f"dirichlet: no draw in {MAX_DIRICHLET_DRAWS} gave every institution "
        f"min_examples={config.min_examples}; raise alpha, lower min_examples or use fewer "
        "institutions"
    )


def _shards(
    labels: np.ndarray, institutions: int, config: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID (McMahan et al. 2017): sort by label, cut into equal shards, deal
    `shards_per_institution` random shards to each institution; an incomplete last shard is
    dropped."""
    shards = institutions * config.shards_per_institution
    if shards > len(labels):
        raise PartitionError(
            f"shards: {institutions} institutions x {config.shards_per_institution} shards "
            f"needs at least {shards} examples, have {len(labels)}"
        )
    size = len(labels) // shards
    # Shuffle within each label first so a shard is a random sample of its label(s).
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    pieces = order[: shards * size].reshape(shards, size)
    dealt = rng.permutation(shards).reshape(institutions, config.shards_per_institution)
    return [pieces[row].ravel() for row in dealt]


class PartitionRow(StrictModel):
    """One institution's share of the data: its whole shard (training and validation)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    institution: int
    """The institution's index (0-based), as in results.json's `institutions[].id`."""
    examples: int
    """Examples in its shard, validation included."""
    labels: list[int]
    """Examples of each class (index = label), zeros included."""


class Partitions(RootModel[list[PartitionRow]]):
    """partitions.json: one row per institution, in institution order."""

    def to_json(self) -> str:
        """The file's text: one-space indent, as it has always been written."""
        return json.dumps(self.model_dump(mode="json"), indent=1) + "\n"


def label_table(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> list[PartitionRow]:
    """Examples and per-label counts of each institution, for display and `partitions.json`."""
    return [
        PartitionRow(
            institution=i,
            examples=len(part),
            labels=np.bincount(labels[part], minlength=classes).tolist(),
        )
        for i, part in enumerate(parts)
    ]
