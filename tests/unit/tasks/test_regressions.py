"""Inputs that once escaped with a raw library error or collided; each now has a clear answer."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from confide.common.seeding import derive_seed
from confide.tasks.config import DataConfig, TaskConfig
from confide.tasks.datasets import DatasetError, load_csv, load_npz
from confide.tasks.partition import PartitionError
from confide.tasks.splits import federate


def test_validation_split_smaller_than_class_count_falls_back_to_a_plain_shuffle():
    split = federate(
        TaskConfig(name="digits"), DataConfig(validation_fraction=0.05), institutions=10, seed=0
    )
    assert all(len(local.validation) >= 1 for local in split.institutions)


def test_split_that_keeps_nothing_is_a_partition_error():
    with pytest.raises(PartitionError, match=r"data\.validation_fraction"):
        federate(
            TaskConfig(name="synthetic", samples=10),
            DataConfig(validation_fraction=0.9),
            institutions=4,
            seed=0,
        )


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "readable"), (b"PK\x03\x04broken", "readable")],
)
def test_unreadable_npz_is_a_dataset_error(tmp_path, content, reason):
    path = tmp_path / "data.npz"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=reason):
        load_npz(path)


def test_npy_file_instead_of_npz_is_a_dataset_error(tmp_path):
    path = tmp_path / "data.npy"
    np.save(path, np.zeros((3, 2)))
    with pytest.raises(DatasetError, match="single array"):
        load_npz(path)


def test_object_arrays_in_npz_are_refused_with_the_file_name(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, X=np.array([[1, "a"], [2, None]], dtype=object), y=np.array([0, 1]))
    with pytest.raises(DatasetError, match=str(path)):
        load_npz(path)


def test_synthetic_with_too_few_features_for_its_classes_is_refused_at_validation():
    with pytest.raises(ValidationError, match="need at least 3 features"):
        TaskConfig(name="synthetic", features=2, classes=5)


def test_csv_with_byte_order_mark_finds_the_label_column(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefflabel,a\n0,1.0\n1,2.0\n".encode())
    assert load_csv(path, "label").classes == 2


def test_integer_csv_labels_are_ordered_numerically(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,label\n1,9\n2,10\n3,2\n")
    data = load_csv(path, "label")
    assert data.label_names == ("2", "9", "10")
    assert data.y.tolist() == [1, 2, 0]


@pytest.mark.parametrize(
    ("left", "right"),
    [((3, 1), (3, 1, 0)), ((3,), (3, 0)), ((5, "a"), (5, 97)), ((0, 2**32), (0, 0, 1))],
)
def test_derived_seeds_do_not_collide_for_different_parts(left, right):
    assert derive_seed(*left) != derive_seed(*right)


@pytest.mark.parametrize("cell", ["", "   "])
def test_csv_row_with_empty_label_is_refused_with_its_line_number(tmp_path, cell):
    path = tmp_path / "data.csv"
    path.write_text(f"a,label\n1,0\n2,1\n3,{cell}\n")
    with pytest.raises(DatasetError, match=r"data\.csv:4: empty label in column 'label'"):
        load_csv(path, "label")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_npz_with_non_finite_float_label_is_refused_naming_the_index(tmp_path, bad):
    path = tmp_path / "data.npz"
    np.savez(path, X=np.ones((4, 2)), y=np.array([0.0, 1.0, bad, 1.0]))
    with pytest.raises(DatasetError, match=r"data\.npz: non-finite label at index 2"):
        load_npz(path)


@pytest.mark.parametrize("y", [np.array([0, 1, 1, 0]), np.array(["a", "b", "b", "a"])])
def test_npz_integer_and_string_labels_still_load(tmp_path, y):
    path = tmp_path / "data.npz"
    np.savez(path, X=np.ones((4, 2)), y=y)
    assert load_npz(path).classes == 2


def test_csv_or_npz_without_a_feature_column_is_refused(tmp_path):
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("label\n0\n1\n")
    with pytest.raises(DatasetError, match=r"data\.csv:1: needs at least one feature column"):
        load_csv(csv_path, "label")
    npz_path = tmp_path / "data.npz"
    np.savez(npz_path, X=np.ones((2, 0)), y=np.array([0, 1]))
    with pytest.raises(DatasetError, match=r"data\.npz: .*needs at least one feature column"):
        load_npz(npz_path)
