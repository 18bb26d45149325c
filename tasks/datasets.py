"""Dataset loaders: bundled scikit-learn sets, seeded synthetic data, and user CSV/NPZ files
and folders of PNG images.

Every loader returns a `Dataset` of float32 features and int64 labels in `0..classes-1`; the
features are a table (n, d) or images (n, C, H, W). Feature scaling is data-independent on
purpose: statistics computed over private data (a mean, a standard deviation) would be
released outside the DP accountant. Pixels are therefore divided by their format's maximum
(255 for 8-bit PNG), never by the data's own.
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
    """Features `x` float32 and labels `y` (n,) int64 with values in `0..classes-1`.

    `x` is (n, d) for a table or (n, C, H, W) for images: one example's `shape` decides
    which models can take it (a CNN needs images), `features` is its flat size.
    """

    x: np.ndarray
    y: np.ndarray
    classes: int
    label_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.x.ndim < 2 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise DatasetError(
                f"expected x of shape (n, d) or (n, C, H, W) and y of shape (n,), got "
                f"{self.x.shape} and {self.y.shape}"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def shape(self) -> tuple[int, ...]:
        """One example's shape: (d,) for a table, (C, H, W) for images."""
        return tuple(int(size) for size in self.x.shape[1:])

    @property
    def features(self) -> int:
        """The flat size of one example (d, or C * H * W)."""
        return int(np.prod(self.shape))

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


def load_digits_images() -> Dataset:
    """The same digits as `load_digits`, as 1x8x8 images (n, 1, 8, 8) for a CNN."""
    flat = load_digits()
    return Dataset(flat.x.reshape(-1, 1, 8, 8), flat.y, flat.classes, flat.label_names)


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
        row, *at = bad[0]
        position = at[0] if len(at) == 1 else tuple(int(i) for i in at)
        raise DatasetError(f"{where}: non-finite value at row {row}, feature {position}")


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
    """A NumPy `.npz` archive with arrays `X` (n, d) or images (n, C, H, W), and `y` (n,).

    Values are taken as they are: scale them (pixels to [0, 1]) before saving, with constants
    that do not come from the data."""
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
    if x.ndim not in (2, 4):
        raise DatasetError(
            f"{path}: X must be 2-D (examples, features) or 4-D (examples, channels, height, "
            f"width), got shape {x.shape}"
        )
    if x.ndim == 2 and x.shape[1] == 0:
        raise DatasetError(f"{path}: X has shape {x.shape}; needs at least one feature column")
    if x.ndim == 4 and 0 in x.shape[1:]:
        raise DatasetError(f"{path}: X has shape {x.shape}; an image needs every size >= 1")
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


# PNG modes and what they are read as: grayscale (L, 1 channel) or RGB (3 channels); a
# palette is expanded to RGB. Anything else (16-bit, ...) is refused. Alpha is dropped only
# where every pixel is opaque: how to flatten a transparent image is a choice for whoever made
# it, not a guess for the loader.
_READ_AS = {"1": "L", "L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA", "P": "RGBA", "PA": "RGBA"}


def load_image_folder(path: Path, classes: tuple[str, ...] | None = None) -> Dataset:
    """A folder with one sub-folder of PNG images per class: x (n, C, H, W) in [0, 1].

    Class names are the sorted sub-folder names (at least two), or, with `classes` (a job's
    class names), each sub-folder must be named after one of them and the folder may hold
    only some. Pixels are divided by 255, the 8-bit maximum, never by the data's own range.
    Hidden entries (names starting with ".") are skipped.
    """
    x, raw = _read_image_folder(Path(path))
    if classes is None and len(np.unique(raw)) < 2:
        raise DatasetError(
            f"{path}: {len(np.unique(raw))} class folder; need at least 2 (one per class)"
        )
    y, names = _encode_labels(raw, str(path), classes)
    return Dataset(x, y, len(names), names)


def _read_image_folder(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, C, H, W) and each image's class folder name, refusing every bad entry with
    the file or folder it is."""
    if not path.is_dir():
        raise DatasetError(f"{path}: no such folder")
    entries = sorted(entry for entry in path.iterdir() if not entry.name.startswith("."))
    stray = [entry for entry in entries if not entry.is_dir()]
    if stray:
        raise DatasetError(
            f"{stray[0]}: not a folder; {path} must hold only one sub-folder of PNG images "
            "per class"
        )
    if not entries:
        raise DatasetError(f"{path}: no class folders (one sub-folder of PNG images per class)")
    images: list[np.ndarray] = []
    labels: list[str] = []
    first: tuple[Path, tuple[int, ...]] | None = None
    for folder in entries:
        files = sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))
        if not files:
            raise DatasetError(f"{folder}: empty class folder (no PNG images)")
        for file in files:
            pixels = _read_png(file)
            if first is None:
                first = (file, pixels.shape)
            elif pixels.shape != first[1]:
                raise DatasetError(
                    f"{file}: {_describe_image(pixels.shape)}, but {first[0]} is "
                    f"{_describe_image(first[1])}; all images must have the same size and mode"
                )
            images.append(pixels)
            labels.append(folder.name)
    return np.stack(images), np.asarray(labels)


def _describe_image(shape: tuple[int, ...]) -> str:
    channels, height, width = shape
    kind = "grayscale" if channels == 1 else "RGB"
    return f"{width}x{height} pixels {kind}"


def _read_png(file: Path) -> np.ndarray:
    """One PNG as (C, H, W) float32 in [0, 1]: C = 1 for grayscale, 3 for colour."""
    from PIL import Image

    if file.is_dir():
        raise DatasetError(f"{file}: a folder inside a class folder; put the images directly in it")
    if file.suffix.lower() != ".png":
        raise DatasetError(f"{file}: not a PNG file (class folders hold only .png images)")
    try:
        with Image.open(file) as image:
            image.load()
            format_, mode = image.format, image.mode
            read_as = _READ_AS.get(mode)
            pixels = None if read_as is None else np.asarray(image.convert(read_as), np.float32)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{file}: not a readable PNG image ({error})") from None
    if format_ != "PNG":
        raise DatasetError(f"{file}: not a PNG image (its content is {format_})")
    if pixels is None:
        raise DatasetError(
            f"{file}: PNG mode {mode!r} is not supported; save it as 8-bit grayscale (L) or RGB"
        )
    if read_as in ("LA", "RGBA"):
        if (pixels[..., -1] < 255).any():
            raise DatasetError(
                f"{file}: the image has transparent pixels; flatten it onto a background "
                "(grayscale or RGB without alpha) first"
            )
        pixels = pixels[..., 0] if read_as == "LA" else pixels[..., :3]
    pixels = pixels / 255.0
    if pixels.ndim == 2:
        return pixels[np.newaxis]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def describe_shape(shape: tuple[int, ...]) -> str:
    """One example's shape in words, for errors: "64 feature columns", "1x8x8 images"."""
    if len(shape) == 1:
        return f"{shape[0]} feature columns"
    return f"{'x'.join(str(size) for size in shape)} images"


def read_file(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and raw label values of an institution's data (a folder of PNG images per
    class, `.npz` by suffix, else CSV), with every problem refused as a `DatasetError`;
    labels are not encoded yet."""
    path = Path(path)
    if path.is_dir():
        return _read_image_folder(path)
    if path.suffix.lower() == ".npz":
        return _read_npz(path)
    return _read_csv(path, label_column)


def load_file(path: Path, label_column: str, classes: tuple[str, ...] | None = None) -> Dataset:
    """An institution's own data: a folder of PNG images per class, `.npz` by its suffix,
    CSV otherwise."""
    path = Path(path)
    if path.is_dir():
        return load_image_folder(path, classes)
    if path.suffix.lower() == ".npz":
        return load_npz(path, classes)
    return load_csv(path, label_column, classes)


def to_npz(data: Dataset) -> bytes:
    """`data` as an `.npz` archive (X of any shape, y by class name when the dataset has
    names): what an institution holding images is given to try a deployment."""
    import io

    names = data.label_names or tuple(str(k) for k in range(data.classes))
    buffer = io.BytesIO()
    np.savez(buffer, X=data.x, y=np.asarray(names)[data.y])
    return buffer.getvalue()


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
