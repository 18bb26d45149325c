"""`confide-simulate predict`: score data with a saved model (confide.server.model_file).

Without a data file the model is scored on the held-out test set of the run that trained it,
rebuilt from its card (task, data split, seed) exactly as the coordinator built it, so the
metrics printed are the run's reported test metrics. With a file (CSV or NPZ in the task's
format), labels are encoded with the model's own class names; a file without labels (a CSV
without the label column, an NPZ without `y`) is scored without metrics.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from confide.common.config import describe_errors
from confide.common.errors import DatasetError, ModelFileError
from confide.common.files import write_atomic
from confide.server.model_file import ModelCard, fingerprint_test_set, load_model
from confide.tasks.config import DataConfig, TaskConfig
from confide.tasks.datasets import Dataset, load_file
from confide.tasks.metrics import evaluate
from confide.tasks.registry import get_task
from confide.tasks.splits import split_test


@dataclass(frozen=True)
class Predictions:
    """A model's outputs on a set: the predicted class and every class's probability, with
    the metrics when the set has labels."""

    card: ModelCard
    source: str
    predicted: np.ndarray
    probabilities: np.ndarray
    labels: np.ndarray | None
    metrics: dict[str, float] | None


def held_out(card: ModelCard, file: Path | None = None) -> Dataset:
    """The test set the model was scored on in its run: the task's held-out split, rebuilt
    from the card (task, data split, seed). A task that reads a file names it in the card but
    does not locate it (cards travel, paths stay): `file` is that file."""
    name = str(card.task.get("name"))
    tree = dict(card.task)
    if get_task(name).needs_path:
        if file is None:
            raise DatasetError(
                f"the model's test set was cut from the file {card.task.get('path')!r}: give "
                "that file as DATA with --test-split"
            )
        tree["path"] = str(file)
    try:
        task = TaskConfig.model_validate(tree)
        data = DataConfig.model_validate(card.data)
    except ValidationError as error:
        problems = "; ".join(describe_errors(error, TaskConfig))
        raise ModelFileError(f"the card does not describe its test set: {problems}") from None
    if card.run.kind == "deployment" and file is not None:
        return get_task(name).load(task, card.run.seed)  # the coordinator's whole file
    return split_test(task, data, card.run.seed)[1]


def read_data(
    path: Path, card: ModelCard, *, label_column: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features and, when present, labels (encoded with the model's class names) of a CSV or
    NPZ file; DatasetError if the features do not fit the model's input."""
    path = Path(path)
    try:
        labelled = load_file(path, label_column, tuple(card.labels))
        x, y = labelled.x, labelled.y
    except DatasetError:
        unlabelled = _unlabelled(path, label_column)
        if unlabelled is None:
            raise
        x, y = unlabelled, None
    if list(x.shape[1:]) != card.input_shape and x.shape[1:] != (int(np.prod(card.input_shape)),):
        raise DatasetError(
            f"{path}: examples of shape {list(x.shape[1:])}, the model takes {card.input_shape}"
        )
    return x.reshape((len(x), *card.input_shape)).astype(np.float32), y


def _unlabelled(path: Path, label_column: str) -> np.ndarray | None:
    """The features of a file that has no labels at all, else None (the labelled reader's
    error then stands)."""
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                if "y" in archive.files or "X" not in archive.files:
                    return None
                return np.asarray(archive["X"], dtype=np.float32)
        except (OSError, ValueError):
            return None
    try:
        with path.open(newline="") as stream:
            header = next(csv.reader(stream), [])
    except OSError:
        return None
    if not header or label_column in header:
        return None
    try:
        return np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
    except ValueError as error:
        raise DatasetError(f"{path}: not numeric features: {error}") from None


@torch.no_grad()
def _outputs(model: nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = model(torch.as_tensor(x))
    return logits.argmax(dim=1).numpy(), torch.softmax(logits, dim=1).numpy()


def predict(
    model_path: Path,
    data: Path | None = None,
    *,
    label_column: str | None = None,
    test_split: bool = False,
) -> Predictions:
    """Score `data` (default: the model's own held-out test set) with the model at
    `model_path`; `label_column` defaults to the task's. With `test_split`, `data` is the
    file the model's task read, and the test set its run scored is cut from it."""
    model, card = load_model(model_path)
    y: np.ndarray | None
    if data is None or test_split:
        test = held_out(card, data)
        if fingerprint_test_set(test) != card.test_set:
            raise DatasetError(
                f"{data or 'the task'}: not the test set the model's run scored (its "
                "fingerprint differs from the card's test_set: other data, or a changed file)"
            )
        x, y, source = test.x, test.y, "its run's held-out test set"
    else:
        column = label_column or str(card.task.get("label_column", "label"))
        x, y = read_data(data, card, label_column=column)
        source = str(data)
    predicted, probabilities = _outputs(model, x)
    metrics = None
    if y is not None:
        task = get_task(str(card.task["name"]))
        metrics = evaluate(model, x, y, classes=card.classes, extra=task.metrics)
    return Predictions(card, source, predicted, probabilities, y, metrics)


def write_predictions(path: Path, predictions: Predictions) -> None:
    """One CSV row per example: the predicted class name, each class's probability and, when
    known, the true class name."""
    names = predictions.card.labels
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = ["prediction", *(f"p_{name}" for name in names)]
    if predictions.labels is not None:
        header.append("label")
    writer.writerow(header)
    for index, chosen in enumerate(predictions.predicted):
        row = [names[int(chosen)], *(f"{p:.6g}" for p in predictions.probabilities[index])]
        if predictions.labels is not None:
            row.append(names[int(predictions.labels[index])])
        writer.writerow(row)
    write_atomic(path, out.getvalue())
