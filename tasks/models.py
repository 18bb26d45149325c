"""Model builders. Plain PyTorch; layers are ones Opacus computes per-sample gradients for
(Linear, Conv2d, GroupNorm; never BatchNorm, whose batch statistics mix examples)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from confide.common.errors import DatasetError
from confide.tasks.config import ModelConfig

if TYPE_CHECKING:
    from confide.tasks.config import TaskConfig

_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Draw initial weights from `seed` alone, leaving the global torch generator as it was."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(generator_state)


def _dense(config: ModelConfig, width: int, classes: int) -> list[nn.Module]:
    """The `hidden` layers with their activations, then the Linear layer to the logits."""
    layers: list[nn.Module] = []
    for hidden in config.hidden:
        layers += [nn.Linear(width, hidden), _ACTIVATIONS[config.activation]()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return layers


def build_mlp(config: ModelConfig, *, shape: tuple[int, ...], classes: int, seed: int) -> nn.Module:
    """An MLP with the configured hidden widths, initialised from `seed` alone.

    Output is raw logits for `classes` classes (2 for binary tasks, so that one code path
    covers every task). Images (C, H, W) are flattened first; for flat input the layers (and
    so the state_dict's keys and the initial weights for a seed) are what they always were.
    """
    with _seeded(seed):
        flatten: list[nn.Module] = [nn.Flatten()] if len(shape) > 1 else []
        return nn.Sequential(*flatten, *_dense(config, math.prod(shape), classes))


def build_cnn(config: ModelConfig, *, shape: tuple[int, ...], classes: int, seed: int) -> nn.Module:
    """A small CNN for images of `shape` (C, H, W), initialised from `seed` alone.

    Each of `config.channels` is a block: a `kernel_size` convolution that keeps the image
    size, GroupNorm, the activation and, with `config.pool` and while the image is at least
    2x2, 2x2 max pooling.
    Then the last feature maps are flattened (or averaged per channel, `head = "average"`)
    into the `hidden` dense layers and the logits.
    """
    if len(shape) != 3:
        raise DatasetError(
            f"model.kind = 'cnn' needs images (C, H, W); this data's examples have shape "
            f"{tuple(shape)}: use image data (digits-images, images, npz with X of shape "
            "(n, C, H, W)) or model.kind = 'mlp'"
        )
    channels, height, width = shape
    with _seeded(seed):
        layers: list[nn.Module] = []
        for out in config.channels:
            layers += [
                nn.Conv2d(channels, out, config.kernel_size, padding=config.kernel_size // 2),
                nn.GroupNorm(config.groups, out),
                _ACTIVATIONS[config.activation](),
            ]
            if config.pool and min(height, width) >= 2:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            channels = out
        if config.head == "average":
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            flat = channels
        else:
            layers.append(nn.Flatten())
            flat = channels * height * width
        return nn.Sequential(*layers, *_dense(config, flat, classes))


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"mlp": build_mlp, "cnn": build_cnn}


def build_model(
    config: TaskConfig, *, shape: tuple[int, ...], classes: int, seed: int
) -> nn.Module:
    """The model `config.model.kind` names, for examples of `shape` and `classes` outputs."""
    builder = _BUILDERS[config.model.kind]
    return builder(config.model, shape=tuple(shape), classes=classes, seed=seed)
