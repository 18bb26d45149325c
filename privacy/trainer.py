"""Local training of one institution for one round, with DP-SGD (Opacus) or without.

DP-SGD (Abadi et al. 2016) per step: draw a Poisson batch (each example independently with
probability q), clip every per-sample gradient to L2 norm <= C, sum, add N(0, sigma^2 C^2 I),
divide by the expected batch size q*n. Opacus does all three; this module feeds it the
institution's accountant history so that the reported epsilon is cumulative.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from confide.privacy.accounting import (
    HistoryEntry,
    epsilon,
    noise_for_budget,
    sample_rate_and_steps,
)
from confide.privacy.config import PrivacyConfig, TrainConfig
from confide.tasks.datasets import Dataset
from confide.tasks.seeding import derive_seed


class PrivacyError(ValueError):
    """DP-SGD cannot run as configured (e.g. a model layer Opacus cannot make private)."""


@dataclass(frozen=True)
class RoundResult:
    """What one round of local training produced.

    `history` is the full accountant history after this round (the input history plus this
    round's steps); `epsilon` is the cumulative epsilon at `delta` over all of it.
    """

    state: dict[str, torch.Tensor]
    examples: int
    steps: int
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    epsilon: float = 0.0
    delta: float = 0.0
    history: list[HistoryEntry] = field(default_factory=list)


def check_model(model: nn.Module) -> None:
    """Refuse a model Opacus cannot compute per-sample gradients for, naming the layers."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        details = "; ".join(str(error) for error in errors[:5])
        raise PrivacyError(f"model is not compatible with DP-SGD (Opacus): {details}")


def planned_noise(privacy: PrivacyConfig, train: TrainConfig, examples: int, rounds: int) -> float:
    """sigma for this institution: the configured one, or the smallest meeting the target over
    `rounds` rounds of `train.local_epochs` epochs."""
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    assert privacy.target_epsilon is not None  # PrivacyConfig guarantees one of the two
    rate, per_epoch = sample_rate_and_steps(examples, train.batch_size)
    return noise_for_budget(
        privacy.target_epsilon,
        privacy.delta,
        rate,
        per_epoch * train.local_epochs * rounds,
        privacy.accountant,
    )


def _optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    if train.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=train.lr)
    return torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum)


def train_round(
    model: nn.Module,
    data: Dataset,
    train: TrainConfig,
    privacy: PrivacyConfig,
    *,
    history: list[HistoryEntry],
    planned_rounds: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> RoundResult:
    """Train `model` in place on `data` for `train.local_epochs` epochs.

    With privacy on, batches are Poisson-sampled, per-sample gradients clipped and noised, and
    the accountant continues from `history`. `seed` fixes batch sampling and noise (through
    separate derived streams), so the same inputs give the same result: whoever knows the
    seed can regenerate the noise, so in deployment it must be the institution's secret.
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty dataset")
    device = torch.device(device)
    model.to(device).train()
    x = torch.as_tensor(data.x, device=device)
    y = torch.as_tensor(data.y, device=device)
    batches = torch.Generator().manual_seed(derive_seed(seed, "batches", bits=63))
    criterion = nn.CrossEntropyLoss()
    optimizer = _optimizer(model, train)

    if not privacy.enabled:
        steps = 0
        for _ in range(train.local_epochs):
            order = torch.randperm(len(y), generator=batches).to(device)
            for batch in order.split(train.batch_size):
                optimizer.zero_grad(set_to_none=True)
                criterion(model(x[batch]), y[batch]).backward()
                optimizer.step()
                steps += 1
        return RoundResult(
            state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            examples=len(data),
            steps=steps,
            history=list(history),
        )

    from opacus import PrivacyEngine

    check_model(model)
    sigma = planned_noise(privacy, train, len(data), planned_rounds)
    noise = torch.Generator(device=device).manual_seed(derive_seed(seed, "noise", bits=63))
    loader = DataLoader(TensorDataset(x, y), batch_size=train.batch_size, generator=batches)
    # Two known warnings, neither actionable: Opacus says secure_mode is off on every call
    # (the seed's source is the caller's choice, see build_client_app), and backward hooks
    # note that the input does not require grad. Every other warning still shows.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine(accountant=privacy.accountant)
        engine.accountant.history = [tuple(entry) for entry in history]
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise,
            grad_sample_mode=privacy.grad_sample_mode,
        )
        # Opacus takes the expected batch size as int(n * (1/ceil(n/B))), which floating point
        # can round down (to 0 for B = 1 and some n, which would divide the update by zero).
        private_optimizer.expected_batch_size = max(
            1, round(len(data) * private_loader.sample_rate)
        )
        steps = 0
        for _ in range(train.local_epochs):
            for batch_x, batch_y in private_loader:
                private_optimizer.zero_grad(set_to_none=True)
                # An empty Poisson batch still takes a (noise-only) step: skipping it would leak
                # that the batch was empty and break the accountant's step count. Its mean loss is
                # NaN but the per-sample gradients are empty tensors, so the clipped sum is zero.
                criterion(private_model(batch_x), batch_y).backward()
                private_optimizer.step()
                steps += 1
    # Unwrap so the caller's model is a plain module again (no hooks, no grad_sample).
    private_model.remove_hooks()
    private_model.cleanup()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    new_history = [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]
    return RoundResult(
        state=state,
        examples=len(data),
        steps=steps,
        noise_multiplier=sigma,
        sample_rate=float(private_loader.sample_rate),
        epsilon=epsilon(new_history, privacy.delta, privacy.accountant),
        delta=privacy.delta,
        history=new_history,
    )
