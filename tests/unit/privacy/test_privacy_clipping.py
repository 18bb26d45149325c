"""DP-SGD's per-sample clipping, observed through one full-batch step of train_round.

With Poisson rate q = 1 every example is in the batch, and Opacus's update is

    grad = (sum_i clip_C(g_i) + N(0, sigma^2 C^2 I)) / expected_batch_size,  with
    expected_batch_size = int(n * q) = n,

so with plain SGD at lr = 1 and a negligible sigma the parameter change is minus the mean of
the clipped per-sample gradients, whose norm is at most C. The inputs are scaled by 1000 so
that every unclipped per-sample gradient is far larger than C: without clipping the change
would break the bound by orders of magnitude.
"""

from __future__ import annotations

import copy

import pytest
import torch
from rounds import train_round
from torch import nn

from confide.privacy.config import PrivacyConfig, TrainConfig
from confide.privacy.trainer import RoundResult
from confide.tasks.datasets import Dataset

EXAMPLES = 32
SIGMA = 1e-4  # must be > 0; its noise, sigma * C / n per coordinate, is negligible here
FULL_BATCH_SGD = TrainConfig(local_epochs=1, batch_size=64, lr=1.0, optimizer="sgd")


@pytest.fixture(scope="module")
def loud_digits(digits: Dataset) -> Dataset:
    """32 digits with pixels scaled from [0, 1] to [0, 1000]: huge per-sample gradients."""
    few = digits.subset(torch.arange(EXAMPLES).numpy())
    return Dataset(few.x * 1000.0, few.y, few.classes, few.label_names)


def flat(state: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([state[key].reshape(-1).double() for key in keys])


def per_sample_gradients(model: nn.Module, data: Dataset) -> torch.Tensor:
    """(n, parameters) matrix of each example's own loss gradient, one example at a time."""
    model = copy.deepcopy(model)
    x, y = torch.as_tensor(data.x), torch.as_tensor(data.y)
    rows = []
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1).double() for p in model.parameters()]))
    return torch.stack(rows)


def one_step(model: nn.Module, data: Dataset, max_grad_norm: float) -> RoundResult:
    privacy = PrivacyConfig(noise_multiplier=SIGMA, max_grad_norm=max_grad_norm)
    return train_round(
        model, data, train=FULL_BATCH_SGD, privacy=privacy, history=[], planned_rounds=1, seed=0
    )


def parameter_change(model: nn.Module, data: Dataset, max_grad_norm: float) -> torch.Tensor:
    keys = [name for name, _ in model.named_parameters()]
    before = flat(model.state_dict(), keys)
    result = one_step(model, data, max_grad_norm)
    assert result.sample_rate == 1.0
    assert result.steps == 1
    return flat(result.state, keys) - before


def test_batch_size_at_least_n_gives_sample_rate_one_and_one_step(loud_digits, make_model):
    result = one_step(make_model(hidden=()), loud_digits, 1.0)
    assert result.sample_rate == 1.0
    assert result.steps == 1
    assert result.history == [(SIGMA, 1.0, 1)]


def test_unclipped_gradients_are_far_above_the_clip_bound(loud_digits, make_model):
    """The premise of the bound tests: with clipping off they would fail by far."""
    grads = per_sample_gradients(make_model(hidden=()), loud_digits)
    norms = grads.norm(dim=1)
    assert (norms > 1000.0).sum() >= EXAMPLES * 3 // 4
    assert grads.mean(dim=0).norm() > 1000.0


@pytest.mark.parametrize("max_grad_norm", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("hidden", [(), (16,)], ids=["linear", "mlp"])
def test_full_batch_dp_sgd_step_moves_parameters_by_at_most_the_clip_norm(
    loud_digits, make_model, max_grad_norm, hidden
):
    model = make_model(hidden=hidden)
    unclipped_step = per_sample_gradients(model, loud_digits).mean(dim=0).norm()
    assert unclipped_step > 1.5 * max_grad_norm  # so the bound below is not met trivially
    change = parameter_change(model, loud_digits, max_grad_norm)
    assert change.norm() <= max_grad_norm * (1 + 1e-3)
    assert change.norm() > 0.01 * max_grad_norm


def test_full_batch_dp_sgd_step_is_minus_the_mean_clipped_per_sample_gradient(
    loud_digits, make_model
):
    clip = 1.0
    model = make_model(hidden=(16,))
    grads = per_sample_gradients(model, loud_digits)
    factors = (clip / (grads.norm(dim=1) + 1e-6)).clamp(max=1.0)
    expected = -(factors[:, None] * grads).sum(dim=0) / EXAMPLES
    change = parameter_change(model, loud_digits, clip)
    torch.testing.assert_close(change, expected, atol=5e-5, rtol=1e-3)
    # Clipping did something: the unclipped mean step is many times longer.
    assert grads.mean(dim=0).norm() > 20 * change.norm()


def test_larger_clip_norm_gives_a_larger_step(loud_digits, make_model):
    small = parameter_change(make_model(hidden=()), loud_digits, 0.1).norm()
    large = parameter_change(make_model(hidden=()), loud_digits, 10.0).norm()
    assert large > 10 * small
