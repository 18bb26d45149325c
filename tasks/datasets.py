"""Dataset loaders: bundled scikit-learn sets, seeded synthetic data, and user CSV/NPZ files.

Every loader returns a `Dataset` of float32 features and int64 labels in `0..classes-1`.
Feature scaling is data-independent on purpose: statistics computed over private data (a mean,
a standard deviation) would be released outside the DP accountant.
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from confide.common.errors import DatasetError


@dataclass(frozen=True)
class Dataset:
    """Features `x` (n, d) float32 and labels `y` (n,) int64 with values in `0..classes-1`."""

    x: np.ndarray
    y: np.ndarray
    classes: int
    label_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise DatasetError(
                f"expected x of shape (n, d) and y of shape (n,), got {self.x.shape} and "
                f"{self.y.shape}"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def features(self) -> int:
        return int(self.x.shape[1])

    def subset(self, indices: np.ndarray) -> Dataset:
        return Dataset(self.x[indices], self.y[indices], self.classes, self.label_names)

    @staticmethod
    def concatenate(first: Dataset, second: Dataset) -> Dataset:
        return Dataset(
            np.concatenate([first.x, second.x]),
            np.concatenate([first.y, second.y]),
            first.classes,
            first.label_names,
        )


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).

    Pixels are 0..16; dividing by 16 maps them to [0, 1] without looking at the data.
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    return Dataset(
        (bunch.data / 16.0).astype(np.float32),
        bunch.target.astype(np.int64),
        10,
        tuple(str(c) for c in range(10)),
    )


def load_breast_cancer() -> Dataset:
    """scikit-learn's Wisconsin breast cancer set (569 patients, 30 features, binary).

    Features are positive and span five orders of magnitude. They are log-transformed and
    scaled to [0, 1] with each feature's minimum and maximum over the whole public dataset
    (the ranges its description in scikit-learn's DESCR publishes): public metadata, not
    statistics of any institution's shard.
    """
    from sklearn.datasets import load_breast_cancer as sk_cancer

    bunch = sk_cancer()
    low, high = np.log1p(bunch.data.min(axis=0)), np.log1p(bunch.data.max(axis=0))
    scaled = (np.log1p(bunch.data) - low) / (high - low)
    return Dataset(
        scaled.astype(np.float32),
        bunch.target.astype(np.int64),
        2,
        tuple(str(n) for n in bunch.target_names),
    )


def make_synthetic(*, samples: int, features: int, classes: int, seed: int) -> Dataset:
    """Seeded classification data of any size (scikit-learn's `make_classification`)."""
    from sklearn.datasets import make_classification

    informative = max(2, min(features, max(classes.bit_length() + 1, features // 2)))
    x, y = make_classification(
        n_samples=samples,
        n_features=features,
        n_informative=informative,
        n_redundant=0,
        n_classes=classes,
        n_clusters_per_class=1,
        class_sep=1.5,
        random_state=seed,
    )
    return Dataset(x.astype(np.float32), y.astype(np.int64), classes)


def _encode_labels(
    raw: np.ndarray, where: str, classes: tuple[str, ...] | None = None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map label values to class indices.

    Without `classes`, the file's own distinct values in sorted order become 0..k-1 (a single
    class is refused). With `classes` (a job's class names, in the coordinator's order), every
    value must be one of them: the mapping is then the same at every institution, even at one
    that holds only some of the classes. A value that is not a name but an integer index in
    0..k-1 is taken as that index (files exported with numeric codes).
    """
    if classes is None:
        names, codes = np.unique(raw, return_inverse=True)
        if len(names) < 2:
            raise DatasetError(f"{where}: the label has {len(names)} distinct value(s); need >= 2")
        return codes.astype(np.int64), tuple(str(n) for n in names)
    index = {_canonical(name): position for position, name in enumerate(classes)}
    # Codes 0..k-1 stand for classes only when no class name is itself a number: with names
    # "1", "2", "3" a label 1 is the class named "1", never the class at index 1.
    by_position = not any(_is_number(name) for name in classes)
    codes = np.empty(len(raw), dtype=np.int64)
    for row, value in enumerate(raw):
        text = _canonical(str(value))
        if text in index:
            codes[row] = index[text]
        elif by_position and isinstance(value, np.integer) and 0 <= int(value) < len(classes):
            codes[row] = int(value)
        else:
            raise DatasetError(
                f"{where}: label {str(value)!r} (example {row}) is not one of the job's "
                f"classes {', '.join(classes)}"
            )
    return codes, tuple(classes)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _canonical(text: str) -> str:
    """One spelling per label: whole numbers without a fraction ("1.0" and "1" are "1")."""
    try:
        number = float(text)
    except ValueError:
        return text.strip()
    if math.isfinite(number) and number == round(number):
        return str(int(number))
    return text.strip()


def _numeric_if_possible(labels: list[str]) -> np.ndarray:
    """Integer labels sort as numbers (2 < 10), anything else as text."""
    try:
        numbers = np.asarray([float(label) for label in labels])
    except ValueError:
        return np.asarray(labels)
    if np.all(np.isfinite(numbers)) and np.all(numbers == np.round(numbers)):
        return numbers.astype(np.int64)
    return np.asarray(labels)


def _require_finite(x: np.ndarray, where: str) -> None:
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        row, col = bad[0]
        raise DatasetError(f"{where}: non-finite value at row {row}, feature {col}")


def load_csv(path: Path, label_column: str, classes: tuple[str, ...] | None = None) -> Dataset:
    """A CSV file with a header row, numeric feature columns and one label column.

    `classes`: the class names to encode labels with (see `_encode_labels`)."""
    x, labels = _read_csv(Path(path), label_column)
    y, names = _encode_labels(labels, str(path), classes)
    return Dataset(x, y, len(names), names)


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and raw label values of a CSV file, refusing bad cells with file:line."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    # utf-8-sig: spreadsheets often save a byte-order mark before the first column name.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise DatasetError(f"{path}: the file is empty") from None
        if label_column not in header:
            raise DatasetError(
                f"{path}: no label column '{label_column}' (columns: {', '.join(header)})"
            )
        if len(header) < 2:
            raise DatasetError(
                f"{path}:1: needs at least one feature column besides '{label_column}'"
            )
        label_at = header.index(label_column)
        features: list[list[float]] = []
        labels: list[str] = []
        for line_number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DatasetError(
                    f"{path}:{line_number}: {len(row)} fields, the header has {len(header)}"
                )
            label = row[label_at].strip()
            if not label:
                raise DatasetError(f"{path}:{line_number}: empty label in column '{label_column}'")
            values: list[float] = []
            for column, cell in enumerate(row):
                if column == label_at:
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    raise DatasetError(
                        f"{path}:{line_number}: column '{header[column]}' is not a number: {cell!r}"
                    ) from None
                if not math.isfinite(value):
                    raise DatasetError(
                        f"{path}:{line_number}: column '{header[column]}' is not finite: {cell!r}"
                    )
                values.append(value)
            features.append(values)
            labels.append(label)
    if not features:
        raise DatasetError(f"{path}: no data rows")
    return np.asarray(features, dtype=np.float32), _numeric_if_possible(labels)


def load_npz(path: Path, classes: tuple[str, ...] | None = None) -> Dataset:
    """A NumPy `.npz` archive with arrays `X` (n, d) and `y` (n,)."""
    x, raw_y = _read_npz(Path(path))
    if classes is not None and np.issubdtype(raw_y.dtype, np.floating):
        whole = raw_y == np.round(raw_y)
        raw_y = raw_y.astype(np.int64) if whole.all() else raw_y
    y, names = _encode_labels(raw_y, str(path), classes)
    return Dataset(x, y, len(names), names)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Features and raw labels of an `.npz` archive, refusing anything but numeric X and y."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{path}: not a readable .npz archive ({error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path}: a single array, not an .npz archive with X and y")
    with archive:
        missing = {"X", "y"} - set(archive.files)
        if missing:
            raise DatasetError(
                f"{path}: missing array(s) {sorted(missing)} (found {sorted(archive.files)})"
            )
        try:
            x, raw_y = archive["X"], archive["y"]
        except ValueError:  # object arrays need pickle, which is never allowed for data
            raise DatasetError(f"{path}: X and y must be numeric arrays, not objects") from None
    if x.ndim != 2:
        raise DatasetError(f"{path}: X must be 2-D (examples, features), got shape {x.shape}")
    if x.shape[1] == 0:
        raise DatasetError(f"{path}: X has shape {x.shape}; needs at least one feature column")
    if raw_y.shape != (len(x),):
        raise DatasetError(f"{path}: y must have shape ({len(x)},), got {raw_y.shape}")
    if np.issubdtype(raw_y.dtype, np.inexact):
        bad = np.flatnonzero(~np.isfinite(raw_y))
        if len(bad):
            raise DatasetError(
                f"{path}: non-finite label at index {bad[0]} of y: {raw_y[bad[0]].item()}"
            )
    try:
        x = x.astype(np.float32)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: X is not numeric (dtype {x.dtype})") from None
    _require_finite(x, str(path))
    return x, raw_y


def read_file(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and raw label values of an institution's file (`.npz` by suffix, else CSV),
    with every problem refused as a `DatasetError`; labels are not encoded yet."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        return _read_npz(path)
    return _read_csv(path, label_column)


def load_file(path: Path, label_column: str, classes: tuple[str, ...] | None = None) -> Dataset:
    """An institution's own data file: `.npz` by its suffix, CSV otherwise."""
    if Path(path).suffix.lower() == ".npz":
        return load_npz(path, classes)
    return load_csv(path, label_column, classes)


def to_csv(data: Dataset, label_column: str = "label") -> str:
    """`data` as CSV text: columns `x0..x{d-1}` and `label_column`, labels by class name when
    the dataset has names (so a file reads the same under any job's class list)."""
    names = data.label_names or tuple(str(k) for k in range(data.classes))
    lines = [",".join([*(f"x{j}" for j in range(data.features)), label_column])]
    lines += [
        ",".join([*(f"{value:.6g}" for value in row), names[label]])
        for row, label in zip(data.x, data.y, strict=True)
    ]
    return "\n".join(lines) + "\n"
