"""confide.privacy.noise: the OS-CSPRNG Gaussian sampler and the DP optimizer that uses it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from confide.privacy.noise import (
    UNIFORM_BITS,
    CsprngDPOptimizer,
    csprng_gaussian_noise,
    csprng_standard_normal,
    csprng_uniform,
)

MOMENT_DRAWS = 1_000_000
KS_DRAWS = 100_000
KS_ALPHA = 1e-6  # a correct sampler fails one run in a million

# Opacus hooks on a model whose input needs no gradient; expected, as in privacy/trainer.py.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def fake_urandom(words: list[list[int]], calls: list[int]) -> Callable[[int], bytes]:
    """An `os.urandom` that returns the given 53-bit integers (low 11 bits set, to be dropped)."""
    replies: Iterator[list[int]] = iter(words)

    def urandom(size: int) -> bytes:
        calls.append(size)
        reply = next(replies)
        assert size == 8 * len(reply)
        shifted = [(k << (64 - UNIFORM_BITS)) | 0x7FF for k in reply]
        return np.array(shifted, dtype="<u8").tobytes()

    return urandom


def counting_urandom(calls: list[int]) -> Callable[[int], bytes]:
    real = os.urandom

    def urandom(size: int) -> bytes:
        calls.append(size)
        return real(size)

    return urandom


# --- uniforms ------------------------------------------------------------------------------


def test_uniform_is_on_the_open_interval_with_53_bits() -> None:
    u = csprng_uniform(200_000)
    assert u.dtype == np.float64
    assert u.shape == (200_000,)
    assert np.all(u > 0) and np.all(u < 1)
    k = u * 2.0**UNIFORM_BITS
    assert np.array_equal(k, np.floor(k))  # on the 2**-53 grid
    # 53 bits, not fewer: with 200k draws some value has its lowest (53rd) bit set
    assert np.any(k.astype(np.uint64) & np.uint64(1))


def test_uniform_redraws_zeros_and_drops_low_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    top = 2**UNIFORM_BITS - 1
    calls: list[int] = []
    monkeypatch.setattr(os, "urandom", fake_urandom([[0, 1, top, 0], [0, 5], [7]], calls))
    u = csprng_uniform(4)
    assert calls == [32, 16, 8]
    assert u.tolist() == [7 * 2.0**-53, 2.0**-53, 1 - 2.0**-53, 5 * 2.0**-53]


def test_uniform_rejects_negative_count() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        csprng_uniform(-1)
    assert csprng_uniform(0).shape == (0,)


# --- standard normals and the robust noise ------------------------------------------------


def test_standard_normal_moments() -> None:
    z = csprng_standard_normal(MOMENT_DRAWS)
    assert z.dtype == torch.float64
    assert abs(z.mean().item()) < 0.01
    assert abs(z.std().item() - 1) < 0.01


@pytest.mark.parametrize("std", [1.0, 2.5])
def test_robust_noise_moments(std: float) -> None:
    reference = torch.empty(MOMENT_DRAWS, dtype=torch.float64)
    x = csprng_gaussian_noise(std, reference)
    assert abs(x.mean().item()) < 0.01 * std
    assert abs(x.std().item() / std - 1) < 0.01


def test_ks_against_the_normal() -> None:
    stats = pytest.importorskip("scipy.stats")
    z = csprng_standard_normal(KS_DRAWS).numpy()
    assert stats.kstest(z, "norm").pvalue > KS_ALPHA
    robust = csprng_gaussian_noise(1.7, torch.empty(KS_DRAWS, dtype=torch.float64)).numpy()
    assert stats.kstest(robust, stats.norm(scale=1.7).cdf).pvalue > KS_ALPHA
    # The test has power at this size: a 10% error in the scale is rejected.
    assert stats.kstest(robust, stats.norm(scale=1.7 * 1.1).cdf).pvalue < KS_ALPHA


def test_seeding_torch_does_not_reproduce_the_noise() -> None:
    reference = torch.empty(1000)
    torch.manual_seed(0)
    first = csprng_gaussian_noise(1.0, reference)
    torch.manual_seed(0)
    second = csprng_gaussian_noise(1.0, reference)
    assert not torch.equal(first, second)
    # Control: the same check does catch torch's generator.
    torch.manual_seed(0)
    first = torch.normal(0.0, 1.0, size=(1000,))
    torch.manual_seed(0)
    assert torch.equal(first, torch.normal(0.0, 1.0, size=(1000,)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 4, 5), (7,), (), (0, 3)])
def test_noise_follows_the_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    reference = torch.ones(shape, dtype=dtype)
    x = csprng_gaussian_noise(0.5, reference)
    assert x.shape == reference.shape
    assert x.dtype == dtype
    assert x.device == reference.device
    assert torch.isfinite(x).all()
    if x.numel() >= 10:
        assert x.unique().numel() > 1


@pytest.mark.parametrize(
    "device",
    [
        "meta",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_follows_the_reference_device(device: str, dtype: torch.dtype) -> None:
    reference = torch.empty((4, 5), dtype=dtype, device=device)
    x = csprng_gaussian_noise(0.5, reference)
    assert (x.shape, x.dtype, x.device.type) == (reference.shape, dtype, torch.device(device).type)


def test_noise_uses_one_urandom_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "urandom", counting_urandom(calls))
    csprng_gaussian_noise(1.0, torch.empty(30, 40))
    assert calls == [4 * 30 * 40 * 8]


def test_zero_std_gives_zeros_without_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "urandom", counting_urandom(calls))
    x = csprng_gaussian_noise(0.0, torch.empty(5, dtype=torch.float64))
    assert torch.equal(x, torch.zeros(5, dtype=torch.float64))
    assert calls == []


@pytest.mark.parametrize("std", [-1.0, float("nan"), float("inf")])
def test_bad_std_is_refused(std: float) -> None:
    with pytest.raises(ValueError, match="std"):
        csprng_gaussian_noise(std, torch.empty(3))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_real_float_reference_is_refused(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match="floating-point"):
        csprng_gaussian_noise(1.0, torch.zeros(3, dtype=dtype))


# --- the optimizer -------------------------------------------------------------------------


def tiny_model(seed: int = 0) -> GradSampleModule:
    torch.manual_seed(seed)
    return GradSampleModule(nn.Linear(10, 10))


def make_optimizer(
    cls: type[DPOptimizer], model: nn.Module, sigma: float, clip: float, batch: int
) -> DPOptimizer:
    return cls(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=batch,
    )


def zero_gradient_step(model: nn.Module, optimizer: DPOptimizer, batch: int) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = 0 * model(torch.randn(batch, 10)).sum()
    loss.backward()
    optimizer.step()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_optimizer_noise_std_is_sigma_c_over_batch() -> None:
    sigma, clip, batch, steps = 1.3, 0.7, 8, 300
    model = tiny_model()
    optimizer = make_optimizer(CsprngDPOptimizer, model, sigma, clip, batch)
    grads = torch.cat([zero_gradient_step(model, optimizer, batch) for _ in range(steps)])
    assert grads.numel() == steps * 110
    expected = sigma * clip / batch
    assert abs(grads.mean().item()) < 0.05 * expected
    assert abs(grads.std().item() / expected - 1) < 0.03


def test_optimizer_never_calls_torch_normal(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("torch.normal was called")

    model = tiny_model()
    optimizer = make_optimizer(CsprngDPOptimizer, model, 1.0, 1.0, 4)
    calls: list[int] = []
    monkeypatch.setattr(torch, "normal", refuse)
    monkeypatch.setattr(os, "urandom", counting_urandom(calls))
    grad = zero_gradient_step(model, optimizer, 4)
    assert calls == [4 * 100 * 8, 4 * 10 * 8]  # one call per parameter tensor
    assert grad.abs().sum() > 0
    # Control: the parent does draw from torch.normal.
    parent = make_optimizer(DPOptimizer, model, 1.0, 1.0, 4)
    with pytest.raises(AssertionError, match=r"torch\.normal"):
        zero_gradient_step(model, parent, 4)


def test_optimizer_noise_is_not_reproducible_by_seeding() -> None:
    def seeded_step(cls: type[DPOptimizer]) -> torch.Tensor:
        model = tiny_model(seed=0)  # seeds torch, then the batch below is the same too
        return zero_gradient_step(model, make_optimizer(cls, model, 1.0, 1.0, 4), 4)

    assert not torch.equal(seeded_step(CsprngDPOptimizer), seeded_step(CsprngDPOptimizer))
    # Control: Opacus's default noise is reproduced by the same seeding.
    assert torch.equal(seeded_step(DPOptimizer), seeded_step(DPOptimizer))


def test_optimizer_matches_the_parent_without_noise() -> None:
    """Clipping, accumulation, scaling and the processed flags are the parent's."""
    batch = 6
    torch.manual_seed(1)
    x, y = torch.randn(batch, 10), torch.randn(batch, 10)
    grads = {}
    for cls in (DPOptimizer, CsprngDPOptimizer):
        model = tiny_model(seed=2)
        optimizer = make_optimizer(cls, model, 0.0, 0.05, batch)  # clipping is active
        optimizer.zero_grad(set_to_none=True)
        ((model(x) - y) ** 2).sum().backward()
        optimizer.step()
        grads[cls] = [p.grad.clone() for p in model.parameters()]
        assert all(p.summed_grad._processed for p in model.parameters())
        with pytest.raises(ValueError, match="cleared"):
            optimizer.add_noise()  # the same summed gradient cannot be noised twice
    assert all(g.abs().sum() > 0 for g in grads[DPOptimizer])
    for parent, ours in zip(grads[DPOptimizer], grads[CsprngDPOptimizer], strict=True):
        assert torch.equal(parent, ours)


def test_optimizer_refuses_a_generator() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="generator"):
        CsprngDPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
            generator=torch.Generator().manual_seed(0),
        )
    optimizer = make_optimizer(CsprngDPOptimizer, model, 1.0, 1.0, 4)
    optimizer.generator = torch.Generator().manual_seed(0)  # set behind its back
    with pytest.raises(ValueError, match="generator"):
        zero_gradient_step(model, optimizer, 4)
