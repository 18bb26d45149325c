"""seeding.derive_seed: one run seed fans out into independent, reproducible streams."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from confide.common.seeding import derive_seed


def test_derive_seed_is_deterministic():
    assert derive_seed(7, "train", 3, 1) == derive_seed(7, "train", 3, 1)
    assert derive_seed(0) == derive_seed(0)


def test_derive_seed_returns_a_python_int():
    assert type(derive_seed(1, "x")) is int


def test_derive_seed_differs_for_different_institutions_rounds_kinds_and_run_seeds():
    seeds = {
        derive_seed(run, kind, server_round, institution)
        for run, kind, server_round, institution in itertools.product(
            [0, 1], ["train", "evaluate"], range(1, 6), range(5)
        )
    }
    assert len(seeds) == 2 * 2 * 5 * 5


def test_derive_seed_depends_on_the_order_of_parts():
    assert derive_seed(0, "train", 1, 2) != derive_seed(0, "train", 2, 1)


def test_derive_seed_differs_from_the_run_seed_stream():
    assert derive_seed(0, "train") != derive_seed(0, "evaluate")
    assert derive_seed(0, "train") != derive_seed(1, "train")


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1, 2**40, 123456789])
def test_derive_seed_is_in_0_to_2_pow_31_minus_1(seed):
    for parts in [(), ("train",), (1, 2), ("evaluate", 10_000, 99)]:
        value = derive_seed(seed, *parts)
        assert 0 <= value <= 2**31 - 1


def test_derive_seed_values_span_the_31_bit_range():
    values = np.array([derive_seed(0, "x", i) for i in range(2000)])
    assert values.min() >= 0
    assert values.max() <= 2**31 - 1
    assert values.max() > 2**30  # uses the top bit of the 31
    assert len(np.unique(values)) == len(values)


def test_derived_seed_is_accepted_by_numpy_and_torch():
    import torch

    seed = derive_seed(5, "noise", 1)
    np.random.default_rng(seed)
    torch.Generator().manual_seed(seed)
    assert 0 <= seed < 2**31


# -- 63 bits: the DP noise seeds ----------------------------------------------------------


def test_a_63_bit_seed_uses_all_63_bits_and_never_the_64th():
    values = [derive_seed(0, "noise", i, bits=63) for i in range(2000)]
    assert all(0 <= value < 2**63 for value in values)
    assert max(values) >= 2**62  # the top bit is used...
    assert sum(value >= 2**32 for value in values) > 1900  # ...and so are the bits above 32
    assert len(set(values)) == len(values)


def test_63_bit_seeds_differ_for_every_purpose_round_and_institution():
    seeds = {
        derive_seed(run, purpose, server_round, institution, bits=63)
        for run, purpose, server_round, institution in itertools.product(
            [0, 2**40], ["batches", "noise", "central-noise"], range(1, 6), range(5)
        )
    }
    assert len(seeds) == 2 * 3 * 5 * 5


@pytest.mark.parametrize("bits", [0, 64, -1])
def test_seeds_wider_than_63_bits_or_empty_are_refused(bits):
    with pytest.raises(ValueError, match=r"bits must be in 1\.\.63"):
        derive_seed(0, "noise", bits=bits)


def test_the_trainers_generators_are_seeded_with_63_bit_derived_seeds():
    import torch

    from confide.privacy.trainer import round_generators

    cpu = torch.device("cpu")
    for round_seed in (0, 1, 2**62 + 5):
        batches, noise = round_generators(round_seed, cpu, "torch")
        assert noise is not None
        assert batches.initial_seed() == derive_seed(round_seed, "batches", bits=63)
        assert noise.initial_seed() == derive_seed(round_seed, "noise", bits=63)
        assert batches.initial_seed() != noise.initial_seed()
    # Over many rounds the noise seeds take values a 32-bit seed cannot.
    noise_seeds = {round_generators(s, cpu, "torch")[1].initial_seed() for s in range(200)}
    assert len(noise_seeds) == 200 and max(noise_seeds) >= 2**62


def test_the_csprng_noise_source_has_no_seeded_noise_generator():
    import torch

    from confide.privacy.trainer import round_generators

    batches, noise = round_generators(3, torch.device("cpu"), "csprng")
    assert noise is None
    assert batches.initial_seed() == derive_seed(3, "batches", bits=63)
