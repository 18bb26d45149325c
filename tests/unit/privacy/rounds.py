"""One round of `train_round` as the privacy tests call it: the mechanism planned from a
declared size (by default the data's own size, which these tests of the trainer's mechanics
may use; the declared size is what the ClientApp publishes)."""

from __future__ import annotations

from typing import Any

from torch import nn

from confide.privacy import trainer
from confide.privacy.config import PrivacyConfig, TrainConfig
from confide.privacy.mechanism import plan_round
from confide.tasks.datasets import Dataset


def train_round(
    model: nn.Module,
    data: Dataset,
    train: TrainConfig,
    privacy: PrivacyConfig,
    *,
    planned_rounds: int,
    declared: int | None = None,
    **options: Any,
) -> trainer.RoundResult:
    mechanism = plan_round(
        privacy, train, declared_examples=declared or len(data), planned_rounds=planned_rounds
    )
    return trainer.train_round(
        model, data, train=train, privacy=privacy, mechanism=mechanism, **options
    )
