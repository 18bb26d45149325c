"""A task's own metrics (`Task.metrics`): merged into `evaluate`'s result, and checked before
they travel (plain names that are not confide's own, finite numbers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from confide.common.errors import TaskError
from confide.tasks.metrics import evaluate

X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
Y = np.array([0, 1, 1, 1])


def _identity() -> nn.Module:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    return model


def test_a_task_s_metrics_are_added_to_confide_s_own():
    seen = {}

    def predicted_ones(logits, y, *, classes):
        seen.update(shape=tuple(logits.shape), labels=y.tolist(), classes=classes)
        return {"predicted_ones": float((logits.argmax(dim=1) == 1).float().mean())}

    metrics = evaluate(_identity(), X, Y, classes=2, extra=predicted_ones)
    plain = evaluate(_identity(), X, Y, classes=2)

    assert metrics == plain | {"predicted_ones": 0.5}
    assert seen == {"shape": (4, 2), "labels": [0, 1, 1, 1], "classes": 2}


@pytest.mark.parametrize(
    ("returned", "complaint"),
    [
        ({"accuracy": 1.0}, "'accuracy', which confide computes itself"),
        ({"num-examples": 1.0}, "the name 'num-examples'"),
        ({"": 1.0}, "the name ''"),
        ({"score": float("nan")}, "'score' is nan, not a finite number"),
        ({"score": "high"}, "'score' is str, not a number"),
        ([("score", 1.0)], "returned list, not a mapping"),
    ],
)
def test_a_task_s_metrics_are_refused_when_they_could_not_travel(returned, complaint):
    with pytest.raises(TaskError, match=complaint):
        evaluate(_identity(), X, Y, classes=2, extra=lambda logits, y, classes: returned)
