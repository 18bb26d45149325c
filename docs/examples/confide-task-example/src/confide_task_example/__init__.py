"""A confide task of your own: seeded 8x8 striped images, a small CNN and one extra metric.

The task is the `Task` below; the package's pyproject declares it under the entry-point
group `confide.tasks` as `example-stripes`, and a scenario or job names it like a built-in
task (`[task] name = "example-stripes"`). Its settings are `task.options`:

- `samples` (int, default 2000): how many images the loader generates;
- `noise` (float, default 0.3): the standard deviation of the pixel noise;
- `channels` (int, default 8): the CNN's channels.

The CNN uses BatchNorm, which DP-SGD cannot train (a batch statistic mixes examples): with
privacy on, confide refuses it and says how to opt in to Opacus's repair
(`task.fix_model = true`, BatchNorm -> GroupNorm), shown in README.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import UnionType
from typing import TypeGuard

import numpy as np
import torch
from torch import nn

from confide.tasks.config import TaskConfig
from confide.tasks.datasets import Dataset
from confide.tasks.registry import Task

LABELS = ("horizontal", "vertical", "diagonal", "anti-diagonal")
SIZE = 8
DEFAULTS: dict[str, int | float] = {"samples": 2000, "noise": 0.3, "channels": 8}


def _options(config: TaskConfig) -> dict[str, int | float]:
    """The task's options with their defaults; an unknown name is refused (a typo would
    otherwise be ignored in silence)."""
    unknown = sorted(set(config.options) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"example-stripes: unknown options {unknown}; known: {', '.join(sorted(DEFAULTS))}"
        )
    chosen: dict[str, object] = {**DEFAULTS, **config.options}
    samples, noise, channels = chosen["samples"], chosen["noise"], chosen["channels"]
    if not _number(samples, int) or not 40 <= samples <= 1_000_000:
        raise ValueError(f"example-stripes: options.samples must be in 40..1000000, got {samples}")
    if not _number(noise, int | float) or not 0.0 <= noise <= 10.0:
        raise ValueError(f"example-stripes: options.noise must be in 0..10, got {noise}")
    if not _number(channels, int) or not 1 <= channels <= 256:
        raise ValueError(f"example-stripes: options.channels must be in 1..256, got {channels}")
    return {"samples": samples, "noise": float(noise), "channels": channels}


def _number(value: object, kind: type | UnionType) -> TypeGuard[int | float]:
    """`value` is a number of `kind` (a TOML `true` is not the number 1)."""
    return isinstance(value, kind) and not isinstance(value, bool)


def load(config: TaskConfig, seed: int) -> Dataset:
    """`samples` 1x8x8 images of stripes in one of four directions (the label), with a random
    period and phase and Gaussian pixel noise, all drawn from `seed`.

    Pixels are clipped to [0, 1]: a scale fixed in advance, never computed from the data
    (a mean or a range of private data would be released outside the DP accountant).
    """
    chosen = _options(config)
    generator = np.random.default_rng(seed)
    samples = int(chosen["samples"])
    labels = generator.integers(0, len(LABELS), size=samples)
    period = generator.uniform(2.5, 4.0, size=samples)
    phase = generator.uniform(0.0, 2 * math.pi, size=samples)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    # The coordinate the stripes vary along, per direction (rows, columns, both diagonals).
    along = np.stack([rows, cols, rows + cols, rows - cols]).astype(np.float64)[labels]
    wave = np.sin(2 * math.pi * along / period[:, None, None] + phase[:, None, None])
    pixels = 0.5 + 0.5 * wave + generator.normal(0.0, chosen["noise"], size=wave.shape)
    x = np.clip(pixels, 0.0, 1.0).astype(np.float32)[:, None, :, :]
    return Dataset(x, labels.astype(np.int64), len(LABELS), LABELS)


def build(config: TaskConfig, *, shape: tuple[int, ...], classes: int, seed: int) -> nn.Module:
    """BatchNorm of the input, two 3x3 convolutions, the average of each channel and a linear
    layer, initialised from `seed` alone: the coordinator and every institution build the
    same model from the same job.

    With `task.fix_model = true`, Opacus replaces the BatchNorm by GroupNorm with one group
    per channel: each image is then standardised on its own, which is what this task needs.
    (After a convolution with few channels, that replacement would standardise every feature
    map on its own and erase how strongly each filter responds; check what a repair does to
    your own model.)
    """
    if len(shape) != 3:
        raise ValueError(f"example-stripes: the CNN takes images (C, H, W), got shape {shape}")
    width = int(_options(config)["channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.BatchNorm2d(shape[0]),
            nn.Conv2d(shape[0], width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, classes),
        )


def worst_class_recall(logits: torch.Tensor, y: np.ndarray, *, classes: int) -> Mapping[str, float]:
    """The recall of the class the model finds hardest, over the classes present in `y`:
    an average can hide one direction the model never gets right."""
    predicted = logits.argmax(dim=1).numpy()
    recalls = [float(np.mean(predicted[y == k] == k)) for k in range(classes) if np.any(y == k)]
    return {"worst_class_recall": min(recalls)}


TASK = Task(
    name="example-stripes",
    description="seeded 8x8 striped images in 4 directions, a small CNN (docs/examples)",
    loader=load,
    builder=build,
    metrics=worst_class_recall,
)
