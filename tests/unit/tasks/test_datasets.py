"""Dataset loaders: bundled sets, seeded synthetic data, and user CSV / NPZ files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confide.tasks.datasets import (
    Dataset,
    DatasetError,
    load_breast_cancer,
    load_csv,
    load_digits,
    load_npz,
    make_synthetic,
)

# --- bundled and synthetic sets ----------------------------------------------------------------


def test_digits_has_1797_examples_of_64_features_scaled_to_unit_interval_and_10_classes():
    data = load_digits()
    assert data.x.shape == (1797, 64)
    assert data.y.shape == (1797,)
    assert data.x.dtype == np.float32
    assert data.y.dtype == np.int64
    assert data.x.min() >= 0.0
    assert data.x.max() <= 1.0
    assert data.x.max() == pytest.approx(1.0)  # scaled by 16, not left in 0..16
    assert data.classes == 10
    assert set(np.unique(data.y).tolist()) == set(range(10))
    assert data.label_names == tuple(str(c) for c in range(10))
    assert len(data) == 1797
    assert data.features == 64


def test_breast_cancer_has_569_examples_of_30_finite_features_and_binary_labels():
    data = load_breast_cancer()
    assert data.x.shape == (569, 30)
    assert data.x.dtype == np.float32
    assert data.y.dtype == np.int64
    assert np.isfinite(data.x).all()
    assert data.classes == 2
    assert set(np.unique(data.y).tolist()) == {0, 1}
    assert len(data.label_names) == 2


def test_synthetic_is_sized_by_samples_features_and_classes():
    data = make_synthetic(samples=300, features=7, classes=4, seed=0)
    assert data.x.shape == (300, 7)
    assert data.y.shape == (300,)
    assert data.x.dtype == np.float32
    assert data.y.dtype == np.int64
    assert data.classes == 4
    assert set(np.unique(data.y).tolist()) == {0, 1, 2, 3}
    assert np.isfinite(data.x).all()


def test_synthetic_with_the_same_seed_gives_identical_data():
    first = make_synthetic(samples=200, features=5, classes=3, seed=11)
    second = make_synthetic(samples=200, features=5, classes=3, seed=11)
    np.testing.assert_array_equal(first.x, second.x)
    np.testing.assert_array_equal(first.y, second.y)


def test_synthetic_with_a_different_seed_gives_different_data():
    first = make_synthetic(samples=200, features=5, classes=3, seed=11)
    second = make_synthetic(samples=200, features=5, classes=3, seed=12)
    assert not np.array_equal(first.x, second.x)


def test_dataset_refuses_mismatched_shapes():
    with pytest.raises(DatasetError, match="expected x of shape"):
        Dataset(np.zeros((3, 2), np.float32), np.zeros(4, np.int64), 2)
    with pytest.raises(DatasetError, match="expected x of shape"):
        Dataset(np.zeros(3, np.float32), np.zeros(3, np.int64), 2)


def test_dataset_subset_keeps_classes_and_label_names():
    data = Dataset(
        np.arange(8, dtype=np.float32).reshape(4, 2), np.array([0, 1, 0, 1]), 2, ("a", "b")
    )
    part = data.subset(np.array([1, 3]))
    np.testing.assert_array_equal(part.x, [[2, 3], [6, 7]])
    np.testing.assert_array_equal(part.y, [1, 1])
    assert part.classes == 2
    assert part.label_names == ("a", "b")


# --- CSV ---------------------------------------------------------------------------------------


def test_csv_reads_features_around_a_label_column_in_the_middle(write_csv):
    path = write_csv("f1,label,f2\n1.5,0,2\n-3,1,4.25\n0,1,1e3\n")
    data = load_csv(path, "label")
    assert data.x.dtype == np.float32
    assert data.y.dtype == np.int64
    np.testing.assert_array_equal(data.x, np.array([[1.5, 2], [-3, 4.25], [0, 1000]], np.float32))
    np.testing.assert_array_equal(data.y, [0, 1, 1])
    assert data.classes == 2
    assert data.features == 2


def test_csv_label_column_may_be_first_or_last_and_have_any_name(write_csv):
    first = load_csv(write_csv("y,a,b\n1,1,2\n0,3,4\n", "first.csv"), "y")
    last = load_csv(write_csv("a,b,target\n1,2,1\n3,4,0\n", "last.csv"), "target")
    for data in (first, last):
        np.testing.assert_array_equal(data.x, [[1, 2], [3, 4]])
        np.testing.assert_array_equal(data.y, [1, 0])


def test_csv_string_labels_map_to_0_to_k_minus_1_in_sorted_order(write_csv):
    path = write_csv("a,label\n1,dog\n2,cat\n3,bird\n4,cat\n5, dog \n")
    data = load_csv(path, "label")
    assert data.label_names == ("bird", "cat", "dog")
    assert data.classes == 3
    np.testing.assert_array_equal(data.y, [2, 1, 0, 1, 2])  # surrounding spaces are stripped


def test_csv_skips_blank_lines(write_csv):
    data = load_csv(write_csv("a,label\n1,x\n\n2,y\n\n"), "label")
    assert len(data) == 2
    np.testing.assert_array_equal(data.x[:, 0], [1, 2])


def test_csv_missing_file_error_names_the_file(tmp_path: Path):
    path = tmp_path / "absent.csv"
    with pytest.raises(DatasetError) as caught:
        load_csv(path, "label")
    assert str(path) in str(caught.value)
    assert "no such file" in str(caught.value)


def test_csv_empty_file_error_names_the_file_and_says_empty(write_csv):
    path = write_csv("")
    with pytest.raises(DatasetError) as caught:
        load_csv(path, "label")
    assert str(path) in str(caught.value)
    assert "empty" in str(caught.value)


def test_csv_header_without_rows_error_says_no_data_rows(write_csv):
    path = write_csv("a,label\n")
    with pytest.raises(DatasetError) as caught:
        load_csv(path, "label")
    assert str(path) in str(caught.value)
    assert "no data rows" in str(caught.value)


def test_csv_missing_label_column_error_lists_the_columns_found(write_csv):
    path = write_csv("alpha,beta,gamma\n1,2,3\n")
    with pytest.raises(DatasetError) as caught:
        load_csv(path, "label")
    message = str(caught.value)
    assert str(path) in message
    assert "'label'" in message
    assert "alpha, beta, gamma" in message


def test_csv_non_numeric_cell_error_gives_line_number_and_column_name(write_csv):
    path = write_csv("a,b,label\n1,2,0\n3,oops,1\n")
    with pytest.raises(DatasetError) as caught:
        load_csv(path, "label")
    message = str(caught.value)
    assert f"{path}:3:" in message  # the header is line 1
    assert "'b'" in message
    assert "'oops'" in message
    assert "not a number" in message


def test_csv_wrong_field_count_error_gives_line_number_and_counts(write_csv):
    path = write_csv("a,b,label\n1,2,0\n3,1\n")
    with pytest.raises(DatasetError) as caught:
        load_csv(path, "label")
    message = str(caught.value)
    assert f"{path}:3:" in message
    assert "2 fields" in message
    assert "header has 3" in message


def test_csv_single_class_error_says_at_least_two_labels_are_needed(write_csv):
    path = write_csv("a,label\n1,yes\n2,yes\n3,yes\n")
    with pytest.raises(DatasetError) as caught:
        load_csv(path, "label")
    message = str(caught.value)
    assert str(path) in message
    assert "1 distinct value" in message
    assert "need >= 2" in message


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "NaN"])
def test_csv_non_finite_value_error_names_the_file_and_position(write_csv, bad):
    path = write_csv(f"a,b,label\n1,2,0\n3,{bad},1\n")
    with pytest.raises(DatasetError) as caught:
        load_csv(path, "label")
    message = str(caught.value)
    assert str(path) in message
    assert ":3: column 'b' is not finite" in message


def test_csv_errors_are_value_errors():
    assert issubclass(DatasetError, ValueError)


# --- NPZ ---------------------------------------------------------------------------------------


def test_npz_reads_x_and_y_and_encodes_labels_in_sorted_order(write_npz):
    x = np.arange(12, dtype=np.int32).reshape(4, 3)
    path = write_npz(X=x, y=np.array([7, 3, 7, 3]))
    data = load_npz(path)
    assert data.x.dtype == np.float32
    assert data.y.dtype == np.int64
    np.testing.assert_array_equal(data.x, x.astype(np.float32))
    np.testing.assert_array_equal(data.y, [1, 0, 1, 0])
    assert data.classes == 2
    assert data.label_names == ("3", "7")


def test_npz_string_labels_are_accepted(write_npz):
    path = write_npz(X=np.zeros((3, 2)), y=np.array(["b", "a", "c"]))
    data = load_npz(path)
    assert data.label_names == ("a", "b", "c")
    np.testing.assert_array_equal(data.y, [1, 0, 2])


@pytest.mark.parametrize(
    ("arrays", "missing"),
    [
        ({"y": np.array([0, 1])}, "['X']"),
        ({"X": np.zeros((2, 2))}, "['y']"),
        ({"features": np.zeros((2, 2)), "labels": np.array([0, 1])}, "['X', 'y']"),
    ],
)
def test_npz_missing_arrays_error_names_the_file_and_the_missing_arrays(write_npz, arrays, missing):
    path = write_npz(**arrays)
    with pytest.raises(DatasetError) as caught:
        load_npz(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"missing array(s) {missing}" in message


@pytest.mark.parametrize("shape", [(4,), (4, 2, 2)])
def test_npz_x_that_is_not_2d_is_refused_with_its_shape(write_npz, shape):
    path = write_npz(X=np.zeros(shape), y=np.array([0, 1, 0, 1]))
    with pytest.raises(DatasetError) as caught:
        load_npz(path)
    message = str(caught.value)
    assert str(path) in message
    assert "X must be 2-D" in message
    assert str(shape) in message


@pytest.mark.parametrize("y_shape", [(4, 1), (3,), (5,)])
def test_npz_y_of_the_wrong_shape_is_refused(write_npz, y_shape):
    path = write_npz(X=np.zeros((4, 2)), y=np.zeros(y_shape, dtype=np.int64))
    with pytest.raises(DatasetError) as caught:
        load_npz(path)
    message = str(caught.value)
    assert str(path) in message
    assert "y must have shape (4,)" in message
    assert str(y_shape) in message


def test_npz_non_numeric_x_is_refused_with_its_dtype(write_npz):
    path = write_npz(X=np.array([["a", "b"], ["c", "d"]]), y=np.array([0, 1]))
    with pytest.raises(DatasetError) as caught:
        load_npz(path)
    message = str(caught.value)
    assert str(path) in message
    assert "X is not numeric" in message


def test_npz_non_finite_x_is_refused(write_npz):
    path = write_npz(X=np.array([[1.0, 2.0], [np.inf, 0.0]]), y=np.array([0, 1]))
    with pytest.raises(DatasetError) as caught:
        load_npz(path)
    assert str(path) in str(caught.value)
    assert "non-finite value at row 1, feature 0" in str(caught.value)


def test_npz_single_class_is_refused(write_npz):
    path = write_npz(X=np.zeros((3, 2)), y=np.array([5, 5, 5]))
    with pytest.raises(DatasetError, match="need >= 2"):
        load_npz(path)


def test_npz_unreadable_file_error_names_the_file(tmp_path: Path):
    path = tmp_path / "garbage.npz"
    path.write_text("this is not a numpy archive\n")
    with pytest.raises(DatasetError) as caught:
        load_npz(path)
    message = str(caught.value)
    assert str(path) in message
    assert "not a readable .npz archive" in message


def test_npz_missing_file_error_names_the_file(tmp_path: Path):
    path = tmp_path / "absent.npz"
    with pytest.raises(DatasetError) as caught:
        load_npz(path)
    assert str(path) in str(caught.value)
    assert "no such file" in str(caught.value)


# --- labels encoded with a job's classes (deployment) -------------------------------------------


def test_job_classes_keep_the_global_encoding_when_a_class_is_missing(write_csv):
    path = write_csv("a,label\n0.1,0\n0.2,2\n0.3,2\n")
    data = load_csv(path, "label", classes=("0", "1", "2"))
    assert data.classes == 3
    assert data.y.tolist() == [0, 2, 2]  # not re-numbered to 0, 1


def test_job_classes_match_names_first_then_integer_indices(write_csv):
    classes = ("malignant", "benign")
    named = load_csv(write_csv("a,label\n1,benign\n2,malignant\n"), "label", classes)
    assert named.y.tolist() == [1, 0]
    coded = load_csv(write_csv("a,label\n1,1\n2,0\n", "coded.csv"), "label", classes)
    assert coded.y.tolist() == [1, 0]


def test_a_single_class_file_is_accepted_with_job_classes(write_csv):
    data = load_csv(write_csv("a,label\n1,1\n2,1\n"), "label", classes=("0", "1"))
    assert data.y.tolist() == [1, 1] and data.classes == 2


def test_a_label_outside_the_job_classes_is_refused_with_its_value(write_csv):
    with pytest.raises(DatasetError, match=r"label '7' \(example 1\) is not one of the job's"):
        load_csv(write_csv("a,label\n1,1\n2,7\n"), "label", classes=("0", "1"))


def test_npz_float_labels_are_encoded_with_job_classes(write_npz):
    path = write_npz(X=np.ones((3, 2)), y=np.array([2.0, 0.0, 2.0]))
    assert load_npz(path, ("0", "1", "2")).y.tolist() == [2, 0, 2]


def test_read_file_parses_without_encoding_so_join_can_check_any_file(write_csv):
    from confide.tasks.datasets import read_file

    x, labels = read_file(write_csv("a,b,label\n1,2,x\n3,4,x\n"), "label")
    assert x.shape == (2, 2) and labels.tolist() == ["x", "x"]
    with pytest.raises(DatasetError, match="no label column 'y'"):
        read_file(write_csv("a,label\n1,2\n", "other.csv"), "y")


def test_numeric_class_names_match_by_value_never_by_position(write_csv, write_npz):
    floats = ("1.0", "2.0", "3.0")  # a coordinator's NPZ with float labels names them so
    assert load_csv(write_csv("a,label\n5,1\n6,3\n"), "label", floats).y.tolist() == [0, 2]
    npz = write_npz(X=np.ones((2, 1)), y=np.array([2.0, 1.0]))
    assert load_npz(npz, floats).y.tolist() == [1, 0]
    with pytest.raises(DatasetError, match="label '0'"):
        load_csv(write_csv("a,label\n5,0\n", "zero.csv"), "label", ("1", "2", "3"))
