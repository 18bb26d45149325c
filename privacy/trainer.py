"""Local training of one institution for one round, with DP-SGD (Opacus) or without.

DP-SGD (Abadi et al. 2016) per step: draw a Poisson batch (each example independently with
probability q), clip every per-sample gradient to L2 norm <= C, sum, add N(0, sigma^2 C^2 I),
divide by the expected batch size. q, the step count, sigma and the divisor come from the
round's `Mechanism` (confide.privacy.mechanism), which depends on the institution's declared
size, never on `len(data)`: the data only decides which examples each Poisson draw picks.

Why Opacus's building blocks (GradSampleModule, DPOptimizer) and not `PrivacyEngine`:
`make_private` derives q = 1 / len(data_loader) and the divisor from the dataset it is given,
which is exactly the dependence on the private example count this module must avoid. The
Poisson draw is one Bernoulli(q) mask per step over the local examples (what Opacus's
UniformWithReplacementSampler does), with q and the step count fixed in advance.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from confide.common.errors import PrivacyError
from confide.common.seeding import derive_seed
from confide.privacy.accounting import HistoryEntry, epsilon
from confide.privacy.config import PrivacyConfig, TrainConfig
from confide.privacy.mechanism import Mechanism
from confide.tasks.datasets import Dataset

# Where the DP-SGD Gaussian noise comes from (see confide.privacy.noise and docs/privacy.md):
# "torch" is PyTorch's generator (Mersenne Twister, not cryptographic) seeded with the round's
# seed; "csprng" draws every noise value from the operating system's CSPRNG.
NoiseSource = Literal["torch", "csprng"]


@dataclass(frozen=True)
class RoundResult:
    """What one round of local training produced.

    `examples` is the local (private) training set size: it stays at the institution.
    `history` is the full accountant history after this round (the input history plus this
    round's steps); `epsilon` is the cumulative epsilon at `delta` over all of it.
    """

    state: dict[str, torch.Tensor]
    examples: int
    steps: int
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    divisor: float = 0.0
    epsilon: float = 0.0
    delta: float = 0.0
    history: list[HistoryEntry] = field(default_factory=list)


def check_model(model: nn.Module) -> None:
    """Refuse a model Opacus cannot compute per-sample gradients for.

    Where Opacus's fixers repair it (BatchNorm -> GroupNorm), the message names the layers,
    the replacement and the opt-in (`task.fix_model`): the repair changes the architecture,
    so it is the job's choice, made once and built the same everywhere
    (`confide.tasks.dp_fix`), never done silently here.
    """
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return
    replaced = _repairs(model)
    if not replaced:
        details = "; ".join(str(error) for error in errors[:5])
        raise PrivacyError(f"model is not compatible with DP-SGD (Opacus): {details}")
    reasons = "; ".join(dict.fromkeys(str(error).split(". ")[0] for error in errors))
    layers = ", ".join(f"'{name}': {old}" for name, old, _ in replaced)
    changes = ", ".join(dict.fromkeys(f"{old} -> {new}" for _, old, new in replaced))
    which, them = ("layer", "it") if len(replaced) == 1 else ("layers", "them")
    raise PrivacyError(
        f"model is not compatible with DP-SGD (Opacus): {reasons} ({which} {layers}). Opacus "
        f"can replace {them} ({changes}): set task.fix_model = true, and the coordinator and "
        "every institution build the replaced model"
    )


def _repairs(model: nn.Module) -> list[tuple[str, str, str]]:
    """(layer, its type, the replacement's type) for each layer Opacus's fixers replace, if
    the repaired model then passes validation; empty if it cannot be repaired."""
    from opacus.validators import ModuleValidator

    try:
        fixed = ModuleValidator.fix(copy.deepcopy(model))
        if ModuleValidator.validate(fixed, strict=False):
            return []
    except Exception:  # a fixer that cannot handle this layer: not repairable, say why above
        return []
    new = dict(fixed.named_modules())
    replaced: list[tuple[str, str, str]] = []
    for name, module in model.named_modules():
        if any(outer == "" or name.startswith(f"{outer}.") for outer, _, _ in replaced):
            continue  # inside a layer already replaced whole
        if name in new and type(new[name]) is not type(module):
            replaced.append((name, type(module).__name__, type(new[name]).__name__))
    return [(name or "the model", old, new) for name, old, new in replaced]


def _optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    if train.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=train.lr)
    return torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _plain_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    train: TrainConfig,
    batches: torch.Generator,
) -> int:
    """Shuffled minibatch SGD for `train.local_epochs` epochs; returns the step count."""
    optimizer = _optimizer(model, train)
    criterion = nn.CrossEntropyLoss()
    steps = 0
    for _ in range(train.local_epochs):
        order = torch.randperm(len(y), generator=batches).to(x.device)
        for batch in order.split(train.batch_size):
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x[batch]), y[batch]).backward()
            optimizer.step()
            steps += 1
    return steps


def _dp_optimizer(
    model: nn.Module,
    train: TrainConfig,
    privacy: PrivacyConfig,
    mechanism: Mechanism,
    noise: torch.Generator | None,
) -> torch.optim.Optimizer:
    """Opacus's DPOptimizer (or the CSPRNG variant when `noise` is None): clip to C, sum, add
    N(0, sigma^2 C^2), divide by the mechanism's public divisor."""
    # Any: Opacus annotates expected_batch_size as an int, but divides by whatever it is
    # given, and the divisor q * N is a float.
    settings: dict[str, Any] = {
        "noise_multiplier": mechanism.noise_multiplier,
        "max_grad_norm": privacy.max_grad_norm,
        "expected_batch_size": mechanism.divisor,
        # The per-sample losses are summed (below); "mean" here makes the optimizer divide the
        # noisy sum by expected_batch_size, the public divisor, instead of the batch's size.
        "loss_reduction": "mean",
    }
    if noise is None:
        from confide.privacy.noise import CsprngDPOptimizer

        return CsprngDPOptimizer(_optimizer(model, train), **settings)
    from opacus.optimizers import DPOptimizer

    return DPOptimizer(_optimizer(model, train), generator=noise, **settings)


def round_generators(
    seed: int, device: torch.device, noise_source: NoiseSource
) -> tuple[torch.Generator, torch.Generator | None]:
    """(batch sampling, DP noise) generators of a round: separate streams derived from
    `seed`, 63 bits each (PyTorch takes 64), so that a secret round seed cannot be found by
    trying every 32-bit value. The noise generator is None for the "csprng" source, whose
    noise comes from the OS instead. Batches are drawn on the CPU, noise on `device`."""
    batches = torch.Generator().manual_seed(derive_seed(seed, "batches", bits=63))
    if noise_source != "torch":
        return batches, None
    noise = torch.Generator(device=device).manual_seed(derive_seed(seed, "noise", bits=63))
    return batches, noise


def _dp_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    train: TrainConfig,
    privacy: PrivacyConfig,
    mechanism: Mechanism,
    *,
    seed: int,
    noise_source: NoiseSource,
) -> None:
    """`mechanism.steps` DP-SGD steps on (x, y), the model updated in place."""
    from opacus.grad_sample.utils import prepare_module

    check_model(model)
    batches, noise = round_generators(seed, x.device, noise_source)
    with warnings.catch_warnings():
        # Backward hooks note that the input does not require grad: known, not actionable.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        private_model = prepare_module(
            model, privacy.grad_sample_mode, batch_first=True, loss_reduction="sum"
        )
        optimizer = _dp_optimizer(private_model, train, privacy, mechanism, noise)
        try:
            _dp_steps(private_model, optimizer, x, y, mechanism=mechanism, batches=batches)
        finally:
            _release(model, private_model, optimizer)


def _dp_steps(
    private_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    mechanism: Mechanism,
    batches: torch.Generator,
) -> None:
    """The steps themselves. Poisson sampling: each example joins a step's batch with
    probability q, independently. An empty batch still takes a (noise-only) step: skipping it
    would leak that the batch was empty and break the accountant's step count."""
    criterion = nn.CrossEntropyLoss(reduction="sum")
    for _ in range(mechanism.steps):
        chosen = torch.rand(len(y), generator=batches) < mechanism.sample_rate
        index = chosen.nonzero().flatten().to(x.device)
        optimizer.zero_grad(set_to_none=True)
        if len(index):
            criterion(private_model(x[index]), y[index]).backward()
        else:
            _no_examples(private_model)
        optimizer.step()


def _release(model: nn.Module, private_model: Any, optimizer: torch.optim.Optimizer) -> None:
    """Nothing noise-free stays on the caller's parameters (the last step's clipped sum
    `summed_grad`, per-sample gradients), and the model is a plain module again."""
    optimizer.zero_grad(set_to_none=True)
    private_model.remove_hooks()
    private_model.cleanup()
    for parameter in model.parameters():
        if hasattr(parameter, "summed_grad"):
            del parameter.summed_grad


def _no_examples(model: nn.Module) -> None:
    """Per-sample gradients of an empty batch, set directly: not every grad-sample mode can
    run a forward pass on zero examples (ExpandedWeights refuses one), and whether a batch is
    empty must never decide whether the round fails."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            # Opacus reads per-sample gradients from this attribute, which it adds itself.
            parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))  # type: ignore[attr-defined]


def train_round(
    model: nn.Module,
    data: Dataset,
    *,
    train: TrainConfig,
    privacy: PrivacyConfig,
    mechanism: Mechanism,
    history: list[HistoryEntry],
    seed: int,
    device: torch.device | str = "cpu",
    noise_source: NoiseSource = "torch",
) -> RoundResult:
    """Train `model` in place on `data` for one round of `mechanism` (see
    confide.privacy.mechanism.plan_round); with privacy on, DP-SGD continuing `history`.

    With DP an empty `data` is no error: every step is a noise-only step, as for any empty
    Poisson batch (an error would tell n = 0 from n = 1).
    `seed` fixes batch sampling and, with the "torch" noise source, the noise (separate
    derived streams, `round_generators`), so the same inputs give the same result: whoever
    knows the seed can regenerate that noise, so in deployment it must be the institution's
    secret. The "csprng" source draws the noise from the OS CSPRNG instead (not reproducible).
    """
    if len(data) == 0 and not privacy.enabled:
        raise ValueError("cannot train on an empty dataset without DP")
    if mechanism.private != privacy.enabled:
        raise ValueError("the mechanism was planned for another privacy setting")
    device = torch.device(device)
    model.to(device).train()
    x = torch.as_tensor(data.x, device=device)
    y = torch.as_tensor(data.y, device=device)
    if not privacy.enabled:
        batches, _ = round_generators(seed, device, "csprng")
        steps = _plain_sgd(model, x, y, train, batches)
        return RoundResult(_state(model), len(data), steps, history=list(history))
    _dp_sgd(model, x, y, train, privacy, mechanism, seed=seed, noise_source=noise_source)
    return _private_result(model, len(data), mechanism, privacy, history)


def _private_result(
    model: nn.Module,
    examples: int,
    mechanism: Mechanism,
    privacy: PrivacyConfig,
    history: list[HistoryEntry],
) -> RoundResult:
    """What a DP-SGD round reports: its mechanism, and the cumulative epsilon of `history`
    with this round's steps added."""
    new_history = _extend(history, mechanism.history_entry)
    return RoundResult(
        state=_state(model),
        examples=examples,
        steps=mechanism.steps,
        noise_multiplier=mechanism.noise_multiplier,
        sample_rate=mechanism.sample_rate,
        divisor=mechanism.divisor,
        epsilon=epsilon(new_history, privacy.delta, privacy.accountant),
        delta=privacy.delta,
        history=new_history,
    )


def _extend(history: list[HistoryEntry], entry: HistoryEntry) -> list[HistoryEntry]:
    """`history` plus `entry`, merged into the last entry when (sigma, q) repeat (as Opacus's
    accountants keep their history: the same steps, fewer entries)."""
    sigma, rate, steps = entry
    merged = [(float(s), float(q), int(n)) for s, q, n in history]
    if merged and merged[-1][:2] == (sigma, rate):
        merged[-1] = (sigma, rate, merged[-1][2] + steps)
    else:
        merged.append((float(sigma), float(rate), int(steps)))
    return merged
