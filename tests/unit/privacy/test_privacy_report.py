"""privacy.json's words: what the code does, no more (audit finding 3)."""

from __future__ import annotations

import pytest

from confide.privacy.config import CentralPrivacyConfig, PrivacyConfig, TrainConfig
from confide.privacy.report import NOISE_GENERATORS, noise_generator, privacy_report

PRIVACY = PrivacyConfig(target_epsilon=8.0)
CENTRAL = CentralPrivacyConfig(enabled=True, noise_multiplier=1.0)


def row(name: str, generator: str) -> dict[str, object]:
    return {
        "id": name,
        "declared_examples": 300,
        "rounds_trained": 2,
        "epsilon": 3.0,
        "delta": 1e-5,
        "noise_multiplier": 1.1,
        "sample_rate": 0.2,
        "steps": 10,
        "noise_generator": generator,
    }


def report(*generators: str, simulated: bool = False) -> dict[str, object]:
    rows = [row(f"hospital-{i}", g) for i, g in enumerate(generators)]
    rounds = [{"round": 1, "epsilon_max": 3.0, "central_epsilon": 2.0}]
    return privacy_report(
        "job", PRIVACY, TrainConfig(), CENTRAL, rows, rounds, [2], None, simulated=simulated
    )


@pytest.mark.parametrize(
    ("source", "seed", "key"),
    [
        ("csprng", None, "os-csprng"),
        ("torch", None, "torch-os-seeded"),
        ("torch", 7, "torch-scenario-seeded"),
    ],
)
def test_each_round_names_its_noise_generator(source, seed, key):
    assert noise_generator(source, seed) == key
    assert key in NOISE_GENERATORS


def test_a_deployed_statement_names_each_generator_and_claims_no_secret_source():
    statement = report("os-csprng", "torch-os-seeded")["statement"]
    assert "the operating system's CSPRNG (os.urandom) for every noise value (1 institution)" in (
        statement
    )
    assert "PyTorch's default generator (Mersenne Twister, not a cryptographic generator), " in (
        statement
    )
    assert "seeded each round with 63 bits from the operating system's CSPRNG" in statement
    assert "NumPy's PCG64 generator (not a cryptographic generator) seeded with 128 bits" in (
        statement
    )
    assert "secret source" not in statement and "(OS CSPRNG)" not in statement


def test_a_simulated_statement_says_its_noise_is_reproducible():
    statement = report("torch-scenario-seeded", simulated=True)["statement"]
    assert "seeded from the scenario seed and the ledger's position" in statement
    assert "NumPy's PCG64 generator seeded from the scenario seed" in statement


def test_the_sample_level_block_names_the_relation_and_what_is_published():
    sample = report("os-csprng")["sample_level"]
    assert sample["neighbouring"] == "add-remove"
    assert any("declared size N" in line for line in sample["published"])
    assert sample["institutions"][0]["declared_examples"] == 300
    assert "examples" not in sample["institutions"][0]
    assert report("os-csprng")["institution_level"]["neighbouring"] == "zero-out"
