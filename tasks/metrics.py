"""Metrics that judge a model on a labelled set.

- loss: mean cross-entropy;
- accuracy: the fraction of correct predictions;
- precision, recall, F1: macro averages over the classes that occur in the labels or the
  predictions (scikit-learn's `average="macro"`); per class, precision = TP / (TP + FP),
  recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN), each 0 when its denominator is 0;
- AUROC (binary tasks only, from the positive class's softmax probability): the probability
  that a random positive scores above a random negative, ties counting one half
  (the Mann-Whitney U statistic divided by n_pos * n_neg).

Written with NumPy rather than scikit-learn on purpose: a deployed institution starts a new
process for every message, and importing scikit-learn's metrics costs about 1.7 s there.
The unit tests check these against scikit-learn.

A task may add metrics of its own (`Task.metrics`, a `MetricsFn`): `evaluate` merges them into
its result wherever the task's model is judged (the coordinator's test set, each institution's
validation set), so they reach results.json like the built-in ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch
from torch import nn

from confide.common.errors import TaskError

# The names `evaluate` itself reports; a task's own metrics may not replace them.
BUILTIN_METRICS = frozenset(
    {"loss", "accuracy", "precision_macro", "recall_macro", "f1_macro", "auroc"}
)
# A task's metric names: plain identifiers, so that they read the same in results.json, in a
# Flower MetricRecord and in dotted configuration keys (and never collide with `num-examples`).
_METRIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


class MetricsFn(Protocol):
    """A task's own metrics of a model's outputs on a labelled set.

    `logits` (n, classes) on the CPU, `y` (n,) int64 labels in `0..classes-1`. Return the same
    names on every call: the federated mean of a metric is over the institutions reporting it.
    """

    def __call__(
        self, logits: torch.Tensor, y: np.ndarray, *, classes: int
    ) -> Mapping[str, float]: ...


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def macro_precision_recall_f1(y: np.ndarray, predicted: np.ndarray) -> tuple[float, float, float]:
    labels = np.union1d(y, predicted)
    true_positive = np.array([np.sum((predicted == k) & (y == k)) for k in labels], dtype=float)
    predicted_count = np.array([np.sum(predicted == k) for k in labels], dtype=float)
    actual_count = np.array([np.sum(y == k) for k in labels], dtype=float)
    precision = _safe_ratio(true_positive, predicted_count)
    recall = _safe_ratio(true_positive, actual_count)
    f1 = _safe_ratio(2 * true_positive, predicted_count + actual_count)
    return float(precision.mean()), float(recall.mean()), float(f1.mean())


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    boundaries = np.flatnonzero(np.diff(ordered)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    ranks = np.empty(len(values))
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    positive = y == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    ranks = _average_ranks(np.asarray(score, dtype=float))
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    classes: int,
    extra: MetricsFn | None = None,
) -> dict[str, float]:
    """Return loss, accuracy, macro precision/recall/F1 and (binary) AUROC of `model`, and
    the task's own metrics (`extra`, see `MetricsFn`) of the same outputs."""
    if len(y) == 0:
        raise ValueError("cannot evaluate on an empty set")
    model.eval()
    device = next(model.parameters()).device
    logits = model(torch.as_tensor(x, device=device))
    targets = torch.as_tensor(y, device=device)
    loss = nn.functional.cross_entropy(logits, targets).item()
    predicted = logits.argmax(dim=1).cpu().numpy()
    precision, recall, f1 = macro_precision_recall_f1(np.asarray(y), predicted)
    metrics = {
        "loss": float(loss),
        "accuracy": float((predicted == y).mean()),
        "precision_macro": precision,
        "recall_macro": recall,
        "f1_macro": f1,
    }
    if classes == 2 and len(np.unique(y)) == 2:
        positive = torch.softmax(logits, dim=1)[:, 1].cpu().numpy()
        metrics["auroc"] = binary_auroc(np.asarray(y), positive)
    if extra is not None:
        metrics |= task_metrics(extra, logits.detach().cpu(), np.asarray(y), classes=classes)
    return metrics


def task_metrics(
    extra: MetricsFn, logits: torch.Tensor, y: np.ndarray, *, classes: int
) -> dict[str, float]:
    """A task's own metrics, checked: plain names that are not confide's, finite numbers.

    Checked here rather than trusted because they travel in Flower records and results.json,
    where a bad name or value would fail far from the task that produced it."""
    returned = extra(logits, y, classes=classes)
    if not isinstance(returned, Mapping):
        raise TaskError(
            f"the task's metrics returned {type(returned).__name__}, not a mapping of names "
            "to numbers"
        )
    checked: dict[str, float] = {}
    for name, value in returned.items():
        if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
            raise TaskError(
                f"the task's metrics returned the name {name!r}: use letters, digits and _ "
                "(64 at most), starting with a letter"
            )
        if name in BUILTIN_METRICS:
            raise TaskError(
                f"the task's metrics returned '{name}', which confide computes itself; rename it"
            )
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TaskError(
                f"the task's metric '{name}' is {type(value).__name__}, not a number"
            ) from None
        if not math.isfinite(number):
            raise TaskError(f"the task's metric '{name}' is {number}, not a finite number")
        checked[name] = number
    return checked
