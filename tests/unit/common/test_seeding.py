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
