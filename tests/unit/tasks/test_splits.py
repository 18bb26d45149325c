"""splits.federate: a held-out test set, then per-institution training and validation data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from confide.tasks.config import DataConfig, PartitionConfig, TaskConfig
from confide.tasks.splits import federate, split_test

SAMPLES = 600
TASK = TaskConfig(name="synthetic", samples=SAMPLES, features=6, classes=3)


def _rows(x: np.ndarray) -> list[bytes]:
    """Each row as bytes; synthetic rows are continuous floats, hence unique."""
    return [row.tobytes() for row in np.ascontiguousarray(x)]


def _local_rows(split) -> list[bytes]:
    rows: list[bytes] = []
    for institution in split.institutions:
        rows += _rows(institution.train.x) + _rows(institution.validation.x)
    return rows


def _full_rows(seed: int) -> list[bytes]:
    from confide.tasks.registry import get_task

    return _rows(get_task(TASK.name).load(TASK, seed).x)


def test_synthetic_rows_are_unique_so_rows_identify_examples():
    rows = _full_rows(seed=0)
    assert len(set(rows)) == SAMPLES


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_test_set_is_disjoint_from_every_institution(scheme):
    data = DataConfig(partition=PartitionConfig(scheme=scheme))
    split = federate(TASK, data, institutions=4, seed=0)
    test_rows = set(_rows(split.test.x))
    local = _local_rows(split)
    assert len(test_rows) == len(split.test)
    assert test_rows.isdisjoint(local)
    assert len(set(local)) == len(local)  # no example held by two institutions or twice


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_test_set_and_institutions_together_are_exactly_the_dataset(scheme):
    data = DataConfig(partition=PartitionConfig(scheme=scheme))
    split = federate(TASK, data, institutions=4, seed=0)
    assert sorted(_rows(split.test.x) + _local_rows(split)) == sorted(_full_rows(seed=0))


def test_rows_keep_their_labels_through_the_split():
    from confide.tasks.registry import get_task

    full = get_task(TASK.name).load(TASK, 0)
    label_of = dict(zip(_rows(full.x), full.y.tolist(), strict=True))
    split = federate(TASK, DataConfig(), institutions=3, seed=0)
    parts = [split.test] + [d for i in split.institutions for d in (i.train, i.validation)]
    for part in parts:
        assert [label_of[row] for row in _rows(part.x)] == part.y.tolist()


def test_test_fraction_sets_the_test_set_size():
    split = federate(TASK, DataConfig(test_fraction=0.25), institutions=3, seed=0)
    assert len(split.test) == math.ceil(0.25 * SAMPLES)


def test_same_seed_gives_an_identical_federated_split():
    data = DataConfig(partition=PartitionConfig(scheme="dirichlet"))
    first = federate(TASK, data, institutions=4, seed=3)
    second = federate(TASK, data, institutions=4, seed=3)
    np.testing.assert_array_equal(first.test.x, second.test.x)
    np.testing.assert_array_equal(first.test.y, second.test.y)
    assert first.table == second.table
    for a, b in zip(first.institutions, second.institutions, strict=True):
        np.testing.assert_array_equal(a.train.x, b.train.x)
        np.testing.assert_array_equal(a.train.y, b.train.y)
        np.testing.assert_array_equal(a.validation.x, b.validation.x)
        np.testing.assert_array_equal(a.validation.y, b.validation.y)


def test_different_seed_gives_a_different_split_of_the_same_dataset():
    # A bundled dataset does not depend on the seed, so only the split can differ.
    task = TaskConfig(name="breast-cancer")
    first = federate(task, DataConfig(), institutions=3, seed=0)
    second = federate(task, DataConfig(), institutions=3, seed=1)
    assert len(first.test) == len(second.test)
    assert set(_rows(first.test.x)) != set(_rows(second.test.x))


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_validation_fraction_is_respected_approximately(fraction):
    split = federate(TASK, DataConfig(validation_fraction=fraction), institutions=4, seed=0)
    for institution in split.institutions:
        local = len(institution.train) + len(institution.validation)
        assert len(institution.validation) == math.ceil(fraction * local)
    validation = sum(len(i.validation) for i in split.institutions)
    total = sum(len(i.train) + len(i.validation) for i in split.institutions)
    assert validation / total == pytest.approx(fraction, abs=0.02)


def test_validation_fraction_zero_gives_empty_validation_and_trains_on_everything():
    split = federate(TASK, DataConfig(validation_fraction=0.0), institutions=4, seed=0)
    for institution in split.institutions:
        assert len(institution.validation) == 0
        assert institution.validation.x.shape == (0, TASK.features)
        assert institution.validation.classes == TASK.classes
    assert sum(len(i.train) for i in split.institutions) == SAMPLES - len(split.test)


def test_table_matches_each_institution_local_data():
    split = federate(TASK, DataConfig(), institutions=4, seed=0)
    assert len(split.table) == 4
    for row, institution in zip(split.table, split.institutions, strict=True):
        local_y = np.concatenate([institution.train.y, institution.validation.y])
        assert row.examples == len(local_y)
        assert row.labels == np.bincount(local_y, minlength=TASK.classes).tolist()


def test_split_exposes_classes_and_features_of_the_task():
    split = federate(TASK, DataConfig(), institutions=2, seed=0)
    assert split.classes == TASK.classes
    assert split.features == TASK.features


def test_test_set_is_stratified_by_label():
    split = federate(
        TaskConfig(name="digits"), DataConfig(test_fraction=0.2), institutions=2, seed=0
    )
    counts = np.bincount(split.test.y, minlength=10)
    assert counts.min() >= 35
    assert counts.max() <= 37


def test_split_test_returns_pool_and_test_that_partition_the_dataset():
    pool, test = split_test(TASK, DataConfig(), seed=0)
    assert len(pool) + len(test) == SAMPLES
    assert set(_rows(pool.x)).isdisjoint(_rows(test.x))
