"""The coordinator refuses updates that do not fit the global model."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from confide.common.errors import UpdateRejected
from confide.server.replies import check_update


def records(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, torch.from_numpy(v)) for k, v in arrays.items()))


@pytest.fixture
def global_arrays() -> ArrayRecord:
    return records({"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)})


def test_matching_update_is_accepted(global_arrays):
    update = records({"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)})
    check_update(global_arrays, update)  # raises if refused


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"w": np.ones((2, 3), np.float32), "b": np.ones(2, np.float32)}, "w: got"),
        ({"w": np.ones((3, 2), np.float64), "b": np.ones(2, np.float32)}, "float64"),
        ({"w": np.full((3, 2), np.nan, np.float32), "b": np.ones(2, np.float32)}, "NaN"),
        ({"w": np.full((3, 2), np.inf, np.float32), "b": np.ones(2, np.float32)}, "infinity"),
        ({"w": np.ones((3, 2), np.float32)}, "names differ"),
        (
            {
                "w": np.ones((3, 2), np.float32),
                "b": np.ones(2, np.float32),
                "extra": np.ones(1, np.float32),
            },
            "extra",
        ),
    ],
)
def test_malformed_update_is_rejected_with_the_reason(global_arrays, update, reason):
    with pytest.raises(UpdateRejected, match=reason):
        check_update(global_arrays, records(update))
