"""Model builders. Plain PyTorch; layers are ones Opacus computes per-sample gradients for."""

from __future__ import annotations

import torch
from torch import nn

from confide.tasks.config import ModelConfig

_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


def build_mlp(config: ModelConfig, *, features: int, classes: int, seed: int) -> nn.Module:
    """An MLP with the configured hidden widths, initialised from `seed` alone.

    Output is raw logits for `classes` classes (2 for binary tasks, so that one code path
    covers every task).
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = []
        width = features
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), _ACTIVATIONS[config.activation]()]
            width = hidden
        layers.append(nn.Linear(width, classes))
        return nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(generator_state)
