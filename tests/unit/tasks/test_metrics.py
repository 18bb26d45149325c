"""metrics.evaluate: loss, accuracy, macro precision/recall/F1 and binary AUROC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from confide.tasks.metrics import evaluate

BASE_KEYS = {"loss", "accuracy", "precision_macro", "recall_macro", "f1_macro"}


def _oracle(classes: int) -> nn.Module:
    """A linear model that maps a one-hot input to a confident logit for that class."""
    model = nn.Linear(classes, classes)
    with torch.no_grad():
        model.weight.copy_(10.0 * torch.eye(classes))
        model.bias.zero_()
    return model


def _one_hot(y: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[y]


def _labels(classes: int, per_class: int = 5) -> np.ndarray:
    return np.random.default_rng(0).permutation(np.repeat(np.arange(classes), per_class))


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_perfect_model_scores_accuracy_one_and_f1_one(classes):
    y = _labels(classes)
    metrics = evaluate(_oracle(classes), _one_hot(y, classes), y, classes=classes)
    assert metrics["accuracy"] == 1.0
    assert metrics["f1_macro"] == pytest.approx(1.0)
    assert metrics["precision_macro"] == pytest.approx(1.0)
    assert metrics["recall_macro"] == pytest.approx(1.0)
    assert 0.0 <= metrics["loss"] < 1e-3


def test_always_wrong_model_scores_accuracy_zero():
    y = _labels(3)
    wrong = (y + 1) % 3
    metrics = evaluate(_oracle(3), _one_hot(wrong, 3), y, classes=3)
    assert metrics["accuracy"] == 0.0
    assert metrics["f1_macro"] == 0.0
    assert metrics["loss"] > 5.0


def test_metrics_are_floats_with_the_expected_keys_for_multiclass():
    y = _labels(4)
    metrics = evaluate(_oracle(4), _one_hot(y, 4), y, classes=4)
    assert set(metrics) == BASE_KEYS
    assert all(isinstance(value, float) for value in metrics.values())


def test_binary_task_also_reports_auroc():
    y = _labels(2)
    metrics = evaluate(_oracle(2), _one_hot(y, 2), y, classes=2)
    assert set(metrics) == BASE_KEYS | {"auroc"}
    assert metrics["auroc"] == pytest.approx(1.0)


def test_auroc_is_not_reported_for_a_multiclass_task():
    y = _labels(3)
    assert "auroc" not in evaluate(_oracle(3), _one_hot(y, 3), y, classes=3)


def test_auroc_is_not_reported_when_a_binary_set_holds_one_class_only():
    y = np.zeros(6, dtype=np.int64)
    metrics = evaluate(_oracle(2), _one_hot(y, 2), y, classes=2)
    assert "auroc" not in metrics
    assert metrics["accuracy"] == 1.0


def test_accuracy_counts_the_fraction_of_correct_predictions():
    y = np.array([0, 1, 0, 1])
    predicted_as = np.array([0, 1, 1, 1])  # one mistake in four
    metrics = evaluate(_oracle(2), _one_hot(predicted_as, 2), y, classes=2)
    assert metrics["accuracy"] == pytest.approx(0.75)


def test_evaluate_leaves_the_model_in_eval_mode():
    model = _oracle(2)
    model.train()
    y = _labels(2)
    evaluate(model, _one_hot(y, 2), y, classes=2)
    assert model.training is False


def test_empty_set_raises_value_error():
    with pytest.raises(ValueError, match="empty"):
        evaluate(_oracle(2), np.zeros((0, 2), np.float32), np.zeros(0, np.int64), classes=2)


@pytest.mark.parametrize("seed", range(8))
def test_macro_scores_equal_scikit_learns(seed):
    from sklearn.metrics import precision_recall_fscore_support

    from confide.tasks.metrics import macro_precision_recall_f1

    rng = np.random.default_rng(seed)
    classes = int(rng.integers(2, 7))
    y = rng.integers(0, classes, size=int(rng.integers(5, 60)))
    predicted = np.where(rng.random(len(y)) < 0.6, y, rng.integers(0, classes + 1, len(y)))
    expected = precision_recall_fscore_support(y, predicted, average="macro", zero_division=0)
    assert macro_precision_recall_f1(y, predicted) == pytest.approx(expected[:3], abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_auroc_equals_scikit_learns_with_ties(seed):
    from sklearn.metrics import roc_auc_score

    from confide.tasks.metrics import binary_auroc

    rng = np.random.default_rng(seed)
    y = np.concatenate([[0, 1], rng.integers(0, 2, size=40)])
    score = np.round(rng.random(len(y)) * 0.6 + 0.4 * y, 1)  # rounded: many ties
    assert binary_auroc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
