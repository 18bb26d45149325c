"""confide.privacy.trainer.train_round: accounting across rounds, seeding, unwrapping."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from rounds import train_round
from torch import nn

from confide.privacy.accounting import epsilon, noise_for_budget
from confide.privacy.config import PrivacyConfig, TrainConfig
from confide.privacy.trainer import PrivacyError, RoundResult, check_model
from confide.tasks.datasets import Dataset

DP = PrivacyConfig(noise_multiplier=1.0, delta=1e-5)
# 200 examples at batch size 20: q = 0.1 and 10 steps per epoch.
TRAIN = TrainConfig(local_epochs=1, batch_size=20, lr=0.1)
ROUNDS = 3


def run_rounds(
    model: nn.Module,
    data: Dataset,
    privacy: PrivacyConfig,
    *,
    carry_history: bool,
    rounds: int = ROUNDS,
) -> list[RoundResult]:
    history: list[tuple[float, float, int]] = []
    results = []
    for round_ in range(rounds):
        result = train_round(
            model,
            data,
            train=TRAIN,
            privacy=privacy,
            history=history,
            planned_rounds=rounds,
            seed=round_,
        )
        if carry_history:
            history = result.history
        results.append(result)
    return results


def opacus_rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    reference = RDPAccountant()
    reference.history = list(history)
    return float(reference.get_epsilon(delta=delta))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_plain_module(model: nn.Module) -> None:
    """No Opacus wrapper, hook or per-sample attribute is left on the model."""
    assert type(model) is nn.Sequential
    assert not hasattr(model, "autograd_grad_sample_hooks")
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name
        assert not module._backward_hooks, name
        assert not module._backward_pre_hooks, name
    for name, parameter in model.named_parameters():
        for attribute in ("grad_sample", "_forward_counter", "_current_grad_sample", "summed_grad"):
            assert not hasattr(parameter, attribute), (name, attribute)


@pytest.fixture(scope="module")
def carried(small_digits, make_model) -> list[RoundResult]:
    """Three DP rounds on one model, each continuing the previous round's history."""
    return run_rounds(make_model(), small_digits, DP, carry_history=True)


@pytest.fixture(scope="module")
def fresh(small_digits, make_model) -> list[RoundResult]:
    """Three DP rounds on one model, each (wrongly) starting from an empty history."""
    return run_rounds(make_model(), small_digits, DP, carry_history=False)


def test_dp_round_reports_sigma_rate_steps_and_delta(carried):
    first = carried[0]
    assert first.examples == 200
    assert first.steps == 10
    assert first.noise_multiplier == 1.0
    assert first.sample_rate == pytest.approx(0.1, rel=1e-12)
    assert first.delta == DP.delta
    assert first.history == [(1.0, first.sample_rate, 10)]


def test_epsilon_strictly_grows_round_after_round_when_history_is_carried(carried):
    epsilons = [result.epsilon for result in carried]
    assert 0.0 < epsilons[0] < epsilons[1] < epsilons[2]
    assert [sum(n for _, _, n in result.history) for result in carried] == [10, 20, 30]


def test_carried_history_is_the_previous_history_plus_this_rounds_steps(carried):
    for previous, current in itertools.pairwise(carried):
        # sigma and q do not change, so Opacus keeps one entry and adds up the steps
        ((sigma, rate, steps),) = previous.history
        expected = [(sigma, rate, steps + current.steps)]
        assert current.history == expected


def test_reported_epsilon_equals_accounting_and_opacus_on_the_returned_history(carried):
    for result in carried:
        assert result.epsilon == pytest.approx(epsilon(result.history, DP.delta), rel=1e-12)
        assert result.epsilon == pytest.approx(
            opacus_rdp_epsilon(result.history, DP.delta), rel=1e-9
        )


def test_fresh_history_each_round_reports_the_same_epsilon_every_round(fresh):
    epsilons = [result.epsilon for result in fresh]
    assert epsilons[0] > 0.0
    assert epsilons == [epsilons[0]] * ROUNDS
    assert all(result.history == [(1.0, result.sample_rate, 10)] for result in fresh)


def test_carrying_the_history_reports_more_epsilon_than_the_fresh_history_trap(carried, fresh):
    assert carried[0].epsilon == pytest.approx(fresh[0].epsilon, rel=1e-12)
    assert carried[-1].epsilon > fresh[-1].epsilon
    # The fresh runs under-report: the true spend of their 3 rounds is the carried epsilon.
    all_steps = [entry for result in fresh for entry in result.history]
    assert epsilon(all_steps, DP.delta) == pytest.approx(carried[-1].epsilon, rel=1e-12)


def test_prv_accountant_carries_history_and_reports_prv_epsilon(small_digits, make_model):
    privacy = PrivacyConfig(noise_multiplier=1.0, accountant="prv")
    first, second = run_rounds(make_model(), small_digits, privacy, carry_history=True, rounds=2)
    assert second.history == [(1.0, second.sample_rate, 20)]
    assert 0.0 < first.epsilon < second.epsilon
    assert second.epsilon == pytest.approx(
        epsilon(second.history, privacy.delta, accountant="prv"), rel=1e-9
    )
    assert second.epsilon < epsilon(second.history, privacy.delta, accountant="rdp")


def test_target_epsilon_noise_keeps_epsilon_within_target_after_planned_rounds(
    small_digits, make_model
):
    target = 2.0
    privacy = PrivacyConfig(target_epsilon=target, delta=1e-5)
    results = run_rounds(make_model(), small_digits, privacy, carry_history=True)
    planned_sigma = noise_for_budget(
        target_epsilon=target,
        delta=privacy.delta,
        sample_rate=0.1,
        steps=10 * TRAIN.local_epochs * ROUNDS,
    )
    assert {result.noise_multiplier for result in results} == {planned_sigma}
    assert results[0].epsilon < results[1].epsilon < results[2].epsilon
    assert results[-1].epsilon <= target
    assert results[-1].epsilon >= 0.98 * target  # the smallest sigma: the budget is used up
    assert opacus_rdp_epsilon(results[-1].history, privacy.delta) <= target


def test_same_seed_gives_bit_identical_state_and_different_seeds_differ(small_digits, make_model):
    def one_round(seed: int) -> RoundResult:
        return train_round(
            make_model(),
            small_digits,
            train=TRAIN,
            privacy=DP,
            history=[],
            planned_rounds=1,
            seed=seed,
        )

    first, again, other = one_round(7), one_round(7), one_round(8)
    assert first.state.keys() == again.state.keys() == other.state.keys()
    for key in first.state:
        assert torch.equal(first.state[key], again.state[key]), key
    assert first.history == again.history
    assert first.epsilon == again.epsilon
    assert any(not torch.equal(first.state[key], other.state[key]) for key in first.state)


def test_dp_off_reports_no_epsilon_and_returns_the_history_unchanged(small_digits, make_model):
    model = make_model()
    before = snapshot(model)
    history = [(1.3, 0.05, 40)]
    train = TrainConfig(local_epochs=2, batch_size=64, lr=0.1)
    result = train_round(
        model,
        small_digits,
        train=train,
        privacy=PrivacyConfig(enabled=False),
        history=history,
        planned_rounds=5,
        seed=0,
    )
    assert result.epsilon == 0.0
    assert result.noise_multiplier == 0.0
    assert result.sample_rate == 0.0
    assert result.history == [(1.3, 0.05, 40)]
    assert history == [(1.3, 0.05, 40)]
    assert result.steps == 2 * math.ceil(200 / 64)
    assert any(not torch.equal(before[key], result.state[key]) for key in before)


def test_dp_off_is_deterministic_for_a_seed(small_digits, make_model):
    off = PrivacyConfig(enabled=False)
    states = [
        train_round(
            make_model(),
            small_digits,
            train=TRAIN,
            privacy=off,
            history=[],
            planned_rounds=1,
            seed=3,
        ).state
        for _ in range(2)
    ]
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


class BatchSizeRecorder(nn.Sequential):
    """An MLP that records the size of every batch it is called on."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        return super().forward(x)


def test_empty_poisson_batches_take_a_step_and_are_counted(digits):
    tiny = digits.subset(np.arange(3))
    model = BatchSizeRecorder(nn.Linear(digits.features, digits.classes))
    epochs = 4
    result = train_round(
        model,
        tiny,
        train=TrainConfig(local_epochs=epochs, batch_size=1, lr=0.1),
        privacy=DP,
        history=[],
        planned_rounds=1,
        seed=0,
    )
    # The seed draws empty Poisson batches: they take a (noise-only) step without a forward
    # pass, so the model saw fewer batches than the round took steps, and none empty.
    assert 0 < len(model.sizes) < 12 and 0 not in model.sizes
    assert result.steps == epochs * math.ceil(3 / 1) == 12
    assert result.history == [(1.0, result.sample_rate, 12)]
    assert result.sample_rate == pytest.approx(1 / 3, rel=1e-12)
    assert all(torch.isfinite(value).all() for value in result.state.values())
    assert math.isfinite(result.epsilon)
    assert result.epsilon > 0.0


def test_returned_state_has_plain_keys_and_no_hooks_are_left_behind(small_digits, make_model):
    model = make_model()
    plain_keys = set(model.state_dict())
    result = train_round(
        model, small_digits, train=TRAIN, privacy=DP, history=[], planned_rounds=2, seed=0
    )
    assert set(result.state) == plain_keys
    assert not any(key.startswith("_module.") for key in result.state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, result.state[key]), key
    assert_plain_module(model)
    assert check_model(model) is None


def test_the_same_model_can_be_trained_again_with_dp(small_digits, make_model):
    model = make_model()
    first = train_round(
        model, small_digits, train=TRAIN, privacy=DP, history=[], planned_rounds=2, seed=0
    )
    after_first = snapshot(model)
    second = train_round(
        model,
        small_digits,
        train=TRAIN,
        privacy=DP,
        history=first.history,
        planned_rounds=2,
        seed=1,
    )
    assert second.steps == 10
    assert second.history == [(1.0, second.sample_rate, 20)]
    assert any(not torch.equal(after_first[key], second.state[key]) for key in after_first)
    assert_plain_module(model)
    # The model still trains without DP too (no per-sample machinery left in the way).
    third = train_round(
        model,
        small_digits,
        train=TRAIN,
        privacy=PrivacyConfig(enabled=False),
        history=[],
        planned_rounds=1,
        seed=2,
    )
    assert third.steps == 10


def batchnorm_model(features: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, classes)
    )


def test_check_model_refuses_batchnorm_naming_the_problem(digits):
    with pytest.raises(PrivacyError, match="BatchNorm") as refused:
        check_model(batchnorm_model(digits.features, digits.classes))
    assert "not compatible with DP-SGD" in str(refused.value)
    assert isinstance(refused.value, ValueError)


def test_check_model_accepts_plain_mlps(make_model):
    assert check_model(make_model(hidden=())) is None
    assert check_model(make_model(hidden=(32, 16))) is None


def test_dp_round_refuses_a_batchnorm_model_before_training(small_digits):
    model = batchnorm_model(small_digits.features, small_digits.classes)
    before = snapshot(model)
    with pytest.raises(PrivacyError, match="BatchNorm"):
        train_round(
            model, small_digits, train=TRAIN, privacy=DP, history=[], planned_rounds=1, seed=0
        )
    assert all(torch.equal(before[key], model.state_dict()[key]) for key in before)


def test_dp_off_trains_a_batchnorm_model(small_digits):
    model = batchnorm_model(small_digits.features, small_digits.classes)
    result = train_round(
        model,
        small_digits,
        train=TRAIN,
        privacy=PrivacyConfig(enabled=False),
        history=[],
        planned_rounds=1,
        seed=0,
    )
    assert result.steps == 10
    assert result.epsilon == 0.0


def test_an_empty_dataset_is_refused_without_dp_and_takes_noise_only_steps_with_dp(
    make_model, digits
):
    empty = digits.subset(np.arange(0))
    with pytest.raises(ValueError, match="empty dataset"):
        off = PrivacyConfig(enabled=False)
        train_round(
            make_model(),
            empty,
            train=TRAIN,
            privacy=off,
            history=[],
            planned_rounds=1,
            seed=0,
            declared=10,
        )
    model = make_model()
    before = snapshot(model)
    result = train_round(
        model, empty, train=TRAIN, privacy=DP, history=[], planned_rounds=1, seed=0, declared=10
    )
    assert result.steps == 1 and result.examples == 0
    assert any(not torch.equal(before[k], result.state[k]) for k in before)  # the noise moved it


@pytest.mark.parametrize("mode", ["hooks", "ew", "functorch"])
@pytest.mark.parametrize("noise_source", ["torch", "csprng"])
def test_every_grad_sample_mode_takes_empty_poisson_batches_as_noise_only_steps(
    digits, make_model, mode, noise_source
):
    """5 examples declared as 100 at batch 10: q = 0.1, 10 steps, most batches empty. A mode
    that fails on an empty batch would make the round's outcome depend on n."""
    privacy = PrivacyConfig(noise_multiplier=1.0, grad_sample_mode=mode)
    result = train_round(
        make_model(),
        digits.subset(np.arange(5)),
        train=TrainConfig(batch_size=10),
        privacy=privacy,
        history=[],
        planned_rounds=1,
        seed=3,
        declared=100,
        noise_source=noise_source,
    )
    assert result.steps == 10
    assert all(torch.isfinite(value).all() for value in result.state.values())


@pytest.mark.parametrize("examples", [49, 98, 161])
def test_batch_size_one_never_divides_the_update_by_zero(digits, make_model, examples):
    # Opacus's own int(n * (1/n)) is 0 for these n; the trainer must not return NaN weights.
    result = train_round(
        make_model(hidden=()),
        digits.subset(np.arange(examples)),
        train=TrainConfig(batch_size=1),
        privacy=PrivacyConfig(noise_multiplier=1.0),
        history=[],
        planned_rounds=1,
        seed=0,
    )
    assert all(torch.isfinite(value).all() for value in result.state.values())


@pytest.mark.parametrize(
    ("examples", "declared", "batch"), [(93, 93, 1), (99, 120, 1), (200, 150, 20), (1437, 1437, 64)]
)
def test_a_round_takes_the_declared_sizes_rate_and_steps_whatever_the_data_holds(
    digits, make_model, examples, declared, batch
):
    from confide.privacy.mechanism import sampling

    result = train_round(
        make_model(hidden=()),
        digits.subset(np.arange(examples)),
        train=TrainConfig(batch_size=batch),
        privacy=PrivacyConfig(noise_multiplier=1.0),
        history=[],
        planned_rounds=1,
        seed=0,
        declared=declared,
    )
    assert (result.sample_rate, result.steps) == sampling(declared, batch)
    assert result.divisor == pytest.approx(declared * result.sample_rate)


def test_returned_state_is_a_copy_not_the_live_parameters(small_digits, make_model):
    model = make_model()
    config = {"train": TrainConfig(), "privacy": PrivacyConfig(noise_multiplier=1.0)}
    first = train_round(model, small_digits, **config, history=[], planned_rounds=2, seed=0)
    frozen = {k: v.clone() for k, v in first.state.items()}
    train_round(model, small_digits, **config, history=first.history, planned_rounds=2, seed=1)
    assert all(torch.equal(frozen[k], first.state[k]) for k in frozen)
