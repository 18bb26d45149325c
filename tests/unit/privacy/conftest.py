"""Fixtures for the privacy unit tests: small slices of the bundled digits set and MLPs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from torch import nn

from confide.tasks.config import ModelConfig
from confide.tasks.datasets import Dataset, load_digits
from confide.tasks.models import build_mlp

ModelBuilder = Callable[..., nn.Module]


@pytest.fixture(scope="session", autouse=True)
def _single_thread() -> None:
    """One intra-op thread: faster for these tiny models and reproducible across machines."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    """The full bundled digits set (1,797 examples, 64 features in [0, 1], 10 classes)."""
    return load_digits()


@pytest.fixture(scope="session")
def small_digits(digits: Dataset) -> Dataset:
    """200 digits in a fixed random order: 10 Poisson steps per epoch at batch size 20."""
    order = np.random.default_rng(0).permutation(len(digits))[:200]
    return digits.subset(order)


@pytest.fixture(scope="session")
def make_model(digits: Dataset) -> ModelBuilder:
    """Build a fresh digits MLP; the same `seed` always gives the same initial weights."""

    def build(hidden: Sequence[int] = (16,), seed: int = 0) -> nn.Module:
        return build_mlp(
            ModelConfig(hidden=list(hidden)),
            shape=digits.shape,
            classes=digits.classes,
            seed=seed,
        )

    return build
