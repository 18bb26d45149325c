"""check_model's refusal says when Opacus can repair a model, and how to opt in; the opt-in
(`task.fix_model`) builds a model DP-SGD trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from confide.common.errors import PrivacyError
from confide.privacy.config import PrivacyConfig, TrainConfig
from confide.privacy.mechanism import plan_round
from confide.privacy.trainer import check_model, train_round
from confide.tasks.config import TaskConfig
from confide.tasks.datasets import Dataset
from confide.tasks.registry import Task


def _with_batch_norm(config: TaskConfig, *, shape: tuple[int, ...], classes: int, seed: int):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(shape[0], 4, kernel_size=3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * shape[1] * shape[2], classes),
    )


def _no_data(config: TaskConfig, seed: int) -> Dataset:
    raise AssertionError("not loaded")


TASK = Task("batch-norm", "a CNN with BatchNorm", _no_data, builder=_with_batch_norm)


def test_a_repairable_model_is_refused_naming_the_layer_the_repair_and_the_opt_in():
    model = TASK.build_model(TaskConfig(), shape=(1, 4, 4), classes=2, seed=0)

    with pytest.raises(PrivacyError) as caught:
        check_model(model)

    message = str(caught.value)
    assert message.startswith("model is not compatible with DP-SGD (Opacus): BatchNorm cannot")
    assert "(layer '1': BatchNorm2d)" in message
    assert "Opacus can replace it (BatchNorm2d -> GroupNorm)" in message
    assert "set task.fix_model = true" in message


def test_check_model_does_not_change_the_model_it_refuses():
    model = TASK.build_model(TaskConfig(), shape=(1, 4, 4), classes=2, seed=0)
    before = {name: value.clone() for name, value in model.state_dict().items()}

    with pytest.raises(PrivacyError):
        check_model(model)

    assert isinstance(model[1], nn.BatchNorm2d)
    assert model.state_dict().keys() == before.keys()


def test_a_model_opacus_cannot_repair_gets_opacus_s_reason_and_no_opt_in():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()  # eval: not fixable

    with pytest.raises(PrivacyError) as caught:
        check_model(model)

    assert "training mode" in str(caught.value)
    assert "fix_model" not in str(caught.value)


def test_with_fix_model_the_task_builds_a_model_dp_sgd_trains():
    config = TaskConfig(fix_model=True)
    model = TASK.build_model(config, shape=(1, 4, 4), classes=2, seed=0)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(64, 1, 4, 4)).astype(np.float32)
    data = Dataset(x, (x.mean(axis=(1, 2, 3)) > 0.5).astype(np.int64), 2)
    privacy = PrivacyConfig(noise_multiplier=1.0)
    train = TrainConfig(batch_size=16)
    mechanism = plan_round(privacy, train, declared_examples=64, planned_rounds=1)

    check_model(model)
    result = train_round(
        model, data, train=train, privacy=privacy, mechanism=mechanism, history=[], seed=0
    )

    assert isinstance(model[1], nn.GroupNorm)
    assert result.state.keys() == model.state_dict().keys()
    assert result.epsilon > 0
