"""Partitioning labels among institutions: IID, Dirichlet label skew and label shards."""

from __future__ import annotations

import numpy as np
import pytest

from confide.tasks.config import PartitionConfig
from confide.tasks.partition import PartitionError, Partitions, label_table, partition_indices

CLASSES = 10
PER_CLASS = 60
INSTITUTIONS = 10


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """600 shuffled labels, 60 of each of 10 classes."""
    rng = np.random.default_rng(0)
    return rng.permutation(np.repeat(np.arange(CLASSES), PER_CLASS)).astype(np.int64)


def _config(scheme: str, **extra) -> PartitionConfig:
    return PartitionConfig(scheme=scheme, **extra)


def _mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over institutions of the Shannon entropy (nats) of their label distribution."""
    entropies = []
    for part in parts:
        counts = np.bincount(labels[part], minlength=CLASSES)
        p = counts[counts > 0] / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


SCHEMES = ["iid", "dirichlet", "shards"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partitions_are_sorted_disjoint_non_empty_int_arrays(labels, scheme):
    parts = partition_indices(labels, INSTITUTIONS, _config(scheme), seed=0)
    assert len(parts) == INSTITUTIONS
    for part in parts:
        assert part.dtype == np.int64
        assert len(part) > 0
        assert np.all(np.diff(part) > 0)  # sorted, no repeats within a part
        assert part.min() >= 0
        assert part.max() < len(labels)
    combined = np.concatenate(parts)
    assert len(np.unique(combined)) == len(combined)  # no index in two institutions


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_iid_and_dirichlet_cover_every_index_exactly_once(labels, scheme):
    parts = partition_indices(labels, INSTITUTIONS, _config(scheme), seed=0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


def test_iid_parts_differ_in_size_by_at_most_one(labels):
    parts = partition_indices(labels[:597], 7, _config("iid"), seed=3)
    sizes = [len(part) for part in parts]
    assert sum(sizes) == 597
    assert max(sizes) - min(sizes) <= 1


def test_shards_cover_each_index_at_most_once_dropping_only_an_incomplete_last_shard(labels):
    institutions, per_institution = 7, 3
    parts = partition_indices(
        labels[:597],
        institutions,
        _config("shards", shards_per_institution=per_institution),
        seed=0,
    )
    combined = np.concatenate(parts)
    assert len(np.unique(combined)) == len(combined)
    shard_size = 597 // (institutions * per_institution)
    assert len(combined) == shard_size * institutions * per_institution
    assert all(len(part) == shard_size * per_institution for part in parts)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_seed_gives_identical_partitions(labels, scheme):
    first = partition_indices(labels, INSTITUTIONS, _config(scheme), seed=7)
    second = partition_indices(labels, INSTITUTIONS, _config(scheme), seed=7)
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_different_seeds_give_different_partitions(labels, scheme):
    first = partition_indices(labels, INSTITUTIONS, _config(scheme), seed=7)
    second = partition_indices(labels, INSTITUTIONS, _config(scheme), seed=8)
    assert any(
        len(a) != len(b) or not np.array_equal(a, b) for a, b in zip(first, second, strict=True)
    )


def test_iid_institutions_see_nearly_every_label(labels):
    parts = partition_indices(labels, INSTITUTIONS, _config("iid"), seed=0)
    entropy = _mean_label_entropy(labels, parts)
    assert entropy > 0.9 * np.log(CLASSES)


def test_dirichlet_small_alpha_is_more_label_skewed_than_large_alpha(labels):
    skewed = partition_indices(
        labels, INSTITUTIONS, _config("dirichlet", alpha=0.1, min_examples=5), seed=0
    )
    near_iid = partition_indices(
        labels, INSTITUTIONS, _config("dirichlet", alpha=100.0, min_examples=5), seed=0
    )
    skewed_entropy = _mean_label_entropy(labels, skewed)
    near_iid_entropy = _mean_label_entropy(labels, near_iid)
    assert near_iid_entropy > 0.9 * np.log(CLASSES)
    assert skewed_entropy < near_iid_entropy - 0.5


def test_dirichlet_respects_min_examples(labels):
    parts = partition_indices(
        labels, INSTITUTIONS, _config("dirichlet", alpha=0.3, min_examples=20), seed=1
    )
    assert min(len(part) for part in parts) >= 20


@pytest.mark.parametrize("per_institution", [1, 2, 3])
def test_shards_give_each_institution_few_labels(labels, per_institution):
    parts = partition_indices(
        labels, INSTITUTIONS, _config("shards", shards_per_institution=per_institution), seed=0
    )
    # 600 sorted labels cut into 10 x k shards of 60 / k: each shard holds one label only
    for part in parts:
        assert len(np.unique(labels[part])) <= per_institution
    assert _mean_label_entropy(labels, parts) < 0.8 * np.log(CLASSES)


def test_shards_with_unaligned_shards_still_give_at_most_two_labels_per_shard(labels):
    # 597 labels into 21 shards of 28: a shard may straddle a class boundary
    parts = partition_indices(labels[:597], 7, _config("shards", shards_per_institution=3), seed=0)
    assert all(len(np.unique(labels[:597][part])) <= 2 * 3 for part in parts)


def test_more_institutions_than_examples_raises_partition_error(labels):
    with pytest.raises(PartitionError, match="5 examples cannot be split among 10 institutions"):
        partition_indices(labels[:5], 10, _config("iid"), seed=0)


def test_zero_institutions_raises_partition_error(labels):
    with pytest.raises(PartitionError, match="at least one institution"):
        partition_indices(labels, 0, _config("iid"), seed=0)


def test_dirichlet_with_too_many_institutions_for_min_examples_raises_partition_error(labels):
    with pytest.raises(PartitionError) as caught:
        partition_indices(labels, 100, _config("dirichlet", min_examples=10), seed=0)
    message = str(caught.value)
    assert "min_examples=10" in message
    assert "100 institutions" in message
    assert "600 examples" in message


def test_shards_with_too_many_institutions_raises_partition_error(labels):
    with pytest.raises(PartitionError) as caught:
        partition_indices(labels, 400, _config("shards"), seed=0)
    message = str(caught.value)
    assert "400 institutions x 2 shards" in message
    assert "at least 800 examples" in message
    assert "have 600" in message


def test_dirichlet_that_cannot_be_drawn_raises_partition_error_naming_the_scheme(labels):
    with pytest.raises(PartitionError, match=r"^dirichlet: "):
        partition_indices(labels, 50, _config("dirichlet", alpha=0.01, min_examples=10), seed=0)


def test_partition_error_is_a_value_error():
    assert issubclass(PartitionError, ValueError)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_label_table_counts_sum_to_partition_sizes(labels, scheme):
    parts = partition_indices(labels, INSTITUTIONS, _config(scheme), seed=0)
    table = label_table(labels, parts, CLASSES)
    assert [row.institution for row in table] == list(range(INSTITUTIONS))
    for row, part in zip(table, parts, strict=True):
        assert row.examples == len(part)
        assert len(row.labels) == CLASSES
        assert sum(row.labels) == len(part)
        assert row.labels == np.bincount(labels[part], minlength=CLASSES).tolist()


def test_label_table_lists_absent_classes_as_zero():
    labels = np.array([0, 0, 1, 1])
    table = label_table(labels, [np.array([0, 1]), np.array([2, 3])], classes=3)
    assert [row.model_dump() for row in table] == [
        {"institution": 0, "examples": 2, "labels": [2, 0, 0]},
        {"institution": 1, "examples": 2, "labels": [0, 2, 0]},
    ]


def test_partitions_json_keeps_its_one_space_layout_and_reads_back():
    labels = np.array([0, 0, 1, 1])
    table = Partitions(label_table(labels, [np.array([0, 1]), np.array([2, 3])], classes=2))
    text = table.to_json()
    assert text.startswith('[\n {\n  "institution": 0,\n  "examples": 2,\n  "labels": [\n   2,')
    assert Partitions.model_validate_json(text) == table
