"""privacy.json's words: what the code does, no more (audit finding 3)."""

from __future__ import annotations

import pytest

from confide.privacy.config import CentralPrivacyConfig, PrivacyConfig, TrainConfig
from confide.privacy.report import (
    NOISE_GENERATORS,
    PrivacyReport,
    RoundSpend,
    SampleInstitution,
    SampleLevelOff,
    SampleLevelOn,
    noise_generator,
    privacy_report,
)

PRIVACY = PrivacyConfig(target_epsilon=8.0)
CENTRAL = CentralPrivacyConfig(enabled=True, noise_multiplier=1.0)


def row(
    name: str, generator: str | None, dataset_epsilon: float | None = None
) -> SampleInstitution:
    return SampleInstitution(
        id=name,
        declared_examples=300,
        rounds_trained=2,
        epsilon=3.0,
        delta=1e-5,
        noise_multiplier=1.1,
        sample_rate=0.2,
        steps=10,
        noise_generator=generator,
        dataset_epsilon=dataset_epsilon,
        dataset_delta=None,
        dataset_accountant=None,
    )


def report(
    *generators: str,
    simulated: bool = False,
    privacy: PrivacyConfig = PRIVACY,
    central: CentralPrivacyConfig = CENTRAL,
) -> PrivacyReport:
    return privacy_report(
        name="job",
        privacy=privacy,
        train=TrainConfig(),
        central=central,
        institutions=[row(f"hospital-{i}", g) for i, g in enumerate(generators)],
        rounds=[RoundSpend(round=1, epsilon_max=3.0, central_epsilon=2.0)],
        central_releases=[2],
        stopped=None,
        simulated=simulated,
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
    statement = report("os-csprng", "torch-os-seeded").statement
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
    statement = report("torch-scenario-seeded", simulated=True).statement
    assert "seeded from the scenario seed and the ledger's position" in statement
    assert "NumPy's PCG64 generator seeded from the scenario seed" in statement


def test_the_sample_level_block_names_the_relation_and_what_is_published():
    whole = report("os-csprng")
    sample = whole.sample_level
    assert isinstance(sample, SampleLevelOn)
    assert sample.neighbouring == "add-remove"
    assert any("declared size N" in line for line in sample.published)
    assert sample.institutions[0].declared_examples == 300
    assert "examples" not in SampleInstitution.model_fields
    assert whole.institution_level is not None
    assert whole.institution_level.neighbouring == "zero-out"


def test_without_dp_the_sample_level_block_has_only_unit_and_institutions():
    off = report("os-csprng", privacy=PrivacyConfig(enabled=False))
    assert isinstance(off.sample_level, SampleLevelOff)
    assert list(off.model_dump()["sample_level"]) == ["enabled", "unit", "institutions"]
    assert [r.epsilon_max for r in off.per_round] == [None]  # no sample-level DP, no epsilon
    assert "No sample-level DP" in off.statement


def test_without_central_dp_there_is_no_institution_level_block():
    plain = report("os-csprng", central=CentralPrivacyConfig())
    assert plain.institution_level is None
    assert "Institution level" not in plain.statement


def test_the_largest_epsilon_of_any_institution_is_the_reports_and_the_statements():
    rows = [row("a", "os-csprng"), row("b", "os-csprng").model_copy(update={"epsilon": 5.5})]
    sample = privacy_report(
        name="job",
        privacy=PRIVACY,
        train=TrainConfig(),
        central=CentralPrivacyConfig(),
        institutions=rows,
        rounds=[],
        central_releases=[],
        stopped="stopped before round 1",
        simulated=False,
    )
    assert isinstance(sample.sample_level, SampleLevelOn)
    assert sample.sample_level.epsilon_max == 5.5
    assert "epsilon <= 5.500" in sample.statement


def test_an_unbounded_ledger_epsilon_is_written_as_a_string_and_read_back():
    unbounded = row("a", None, dataset_epsilon=float("inf"))
    assert unbounded.dataset_epsilon == "unbounded"
    text = unbounded.model_dump_json()
    assert '"dataset_epsilon":"unbounded"' in text
    assert SampleInstitution.model_validate_json(text) == unbounded


def test_a_report_reads_back_equal_to_what_was_built():
    built = report("os-csprng", "torch-os-seeded")
    assert PrivacyReport.model_validate_json(built.model_dump_json()) == built
