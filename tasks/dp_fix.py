"""The opt-in repair of a model for DP-SGD (`task.fix_model = true`), with Opacus's fixers.

The one place this package uses Opacus, imported lazily inside the function: a model built
for a job must have the same architecture (the same state_dict names and shapes) at the
coordinator and at every institution, so the repair belongs to building the model
(`Task.build_model`), not to training it. Opacus's `ModuleValidator.fix` replaces the layers
DP-SGD cannot train, chiefly BatchNorm, whose statistics mix examples of a batch (it becomes
GroupNorm, with the same number of channels). `confide.privacy.trainer.check_model` says when
a refused model can be repaired this way.
"""

from __future__ import annotations

import torch
from torch import nn


def fix_for_dp(model: nn.Module, *, seed: int) -> nn.Module:
    """A copy of `model` with the layers Opacus cannot train replaced (BatchNorm -> GroupNorm).

    A replacement layer that draws initial values draws them from `seed`, and the global
    generator is restored after, as the model builders do: the coordinator and every
    institution then build the same model.
    """
    from opacus.validators import ModuleValidator

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fixed: nn.Module = ModuleValidator.fix(model)
    return fixed
