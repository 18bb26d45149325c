"""The coordinator's rounds with real ClientApps in process: refusals, budget stops, central DP."""

from __future__ import annotations

import pytest

from confide.privacy.accounting import epsilon
from confide.privacy.config import CentralPrivacyConfig, PrivacyConfig, TrainConfig
from confide.privacy.ledger import Ledger
from confide.privacy.mechanism import sampling
from confide.privacy.policy import PrivacyPolicy
from confide.server.app import run
from confide.server.central_dp import central_epsilon
from confide.server.history import JobHistory
from confide.server.job import FederationConfig, JobConfig
from confide.tasks.config import DataConfig, TaskConfig

pytestmark = pytest.mark.usefixtures("inside_a_run")


def job(rounds: int = 3, **overrides: object) -> JobConfig:
    settings = {
        "task": TaskConfig(name="digits"),
        "data": DataConfig(test_fraction=0.2, validation_fraction=0.1),
        "train": TrainConfig(batch_size=64, lr=1.0),
        "privacy": PrivacyConfig(noise_multiplier=1.0),
        "federation": FederationConfig(
            rounds=rounds, min_train=2, min_available=3, min_evaluate=0, fraction_evaluate=0.0
        ),
    }
    return JobConfig.model_validate(settings | overrides)


def run_job(job_config: JobConfig, grid, source, seed: int | None = 0) -> JobHistory:  # type: ignore[no-untyped-def]
    history = JobHistory()
    run(
        job_config,
        grid,
        history=history,
        test_set=source.split().test,
        name="test-job",
        noise_seed=seed,
    )
    return history


def dataset_epsilon(source, index: int, rounds: int, delta: float = 1e-5) -> float:  # type: ignore[no-untyped-def]
    """What `rounds` rounds of this module's jobs spend at institution `index` (sigma 1)."""
    rate, steps = sampling(source.declared_size(index), 64)
    return epsilon([(1.0, rate, steps * rounds)], delta)


def test_every_round_is_recorded_in_each_institutions_own_ledger(federation, tmp_path):
    grid, source = federation()
    history = run_job(job(rounds=2), grid, source)
    assert [r.trained for r in history.rounds] == [3, 3]
    for index in range(3):
        entries = Ledger(tmp_path / "state" / f"institution-{index}").entries()
        assert [(e.job, e.round, e.dataset) for e in entries] == [
            ("test-job", 1, "default"),
            ("test-job", 2, "default"),
        ]
        spend = history.institutions[str(index)]
        assert spend.dataset_epsilon == pytest.approx(spend.epsilon)  # first job: the same


def test_a_second_job_continues_each_ledger_and_the_limit_stops_it(federation, tmp_path):
    grid, source = federation()
    run_job(job(rounds=2), grid, source)
    four = [dataset_epsilon(source, i, 4) for i in range(3)]
    five = [dataset_epsilon(source, i, 5) for i in range(3)]
    assert max(four) < min(five)
    policy = PrivacyPolicy(max_epsilon=(max(four) + min(five)) / 2)
    grid, source = federation(policy=policy, run_id=2)
    history = run_job(job(rounds=4), grid, source)
    # This job's rounds 1 and 2 are each dataset's 3rd and 4th; a 5th would pass the limit,
    # so every institution refuses round 3 and the job stops with fewer than min_train.
    assert [r.trained for r in history.rounds] == [3, 3, 0]
    assert history.stopped is not None and "min_train is 2" in history.stopped
    assert {r["round"] for r in history.rejected} == {3}
    for index in range(3):
        spend = history.institutions[str(index)]
        assert spend.rounds_trained == 2
        assert spend.epsilon == pytest.approx(dataset_epsilon(source, index, 2))  # this job
        assert spend.dataset_epsilon == pytest.approx(four[index])  # every job
        assert len(Ledger(tmp_path / "state" / f"institution-{index}").entries()) == 4


def test_central_dp_adds_the_noise_it_accounts_and_stops_at_its_budget(federation):
    grid, source = federation()
    central = CentralPrivacyConfig(enabled=True, noise_multiplier=2.0, clipping_norm=0.5)
    after_two = central_epsilon(central, [3, 3])
    limited = central.model_copy(update={"max_epsilon": after_two * 1.01})
    history = run_job(job(rounds=4, central_privacy=limited), grid, source)
    assert len(history.rounds) == 2 and history.central_releases == [3, 3]
    assert history.rounds[-1].central_epsilon == pytest.approx(after_two)
    assert history.stopped is not None and "central_privacy.max_epsilon" in history.stopped


def test_central_dp_is_reproducible_with_a_seed_and_changes_the_model(federation):
    central = CentralPrivacyConfig(enabled=True, noise_multiplier=1.0, clipping_norm=1.0)
    results = []
    for seed, dp in ((0, central), (0, central), (0, CentralPrivacyConfig())):
        # Each from fresh ledgers: the same starting state (see the next test).
        grid, source = federation(run_id=len(results) + 1, state=f"state-{len(results)}")
        history = run_job(job(rounds=1, central_privacy=dp), grid, source, seed)
        results.append(history.rounds[-1].metrics["loss"])
    assert results[0] == results[1] != results[2]


def test_a_run_that_continues_the_ledgers_draws_fresh_noise_and_a_fresh_start_repeats(
    federation,
):
    """Finding 2 of the audit: the same seed on continued ledgers replayed the first run's
    batches and noise, while the ledger composed both runs as independent."""
    losses = []
    for run_id, state in ((1, "kept"), (2, "kept"), (3, "fresh")):
        grid, source = federation(run_id=run_id, state=state)
        history = run_job(job(rounds=2), grid, source, 0)
        losses.append([r.metrics["loss"] for r in history.rounds])
    first, continued, repeated = losses
    assert continued[0] != first[0] and continued[1] != first[1]
    assert repeated == first  # the same seed from the same (empty) starting state


def test_the_privacy_report_recomputes_from_its_own_parameters(federation):
    from confide.server.results import institution_row, privacy_document

    grid, source = federation()
    central = CentralPrivacyConfig(enabled=True, noise_multiplier=3.0, clipping_norm=1.0)
    config = job(rounds=2, central_privacy=central)
    history = run_job(config, grid, source)
    rows = [
        institution_row(
            i,
            config.privacy,
            history,
            key=str(i),
            examples=len(local.train),
            declared_examples=len(local.train),
            validation_examples=0,
        )
        for i, local in enumerate(source.split().institutions)
    ]
    report = privacy_document("test-job", config, history, institutions=rows, simulated=True)
    for row in report.sample_level.institutions:
        assert row.noise_multiplier is not None and row.sample_rate is not None
        history_entry = (row.noise_multiplier, row.sample_rate, row.steps)
        assert row.delta is not None
        assert row.epsilon == pytest.approx(epsilon([history_entry], row.delta))
    level = report.institution_level
    assert level is not None
    assert level.epsilon == pytest.approx(
        central_epsilon(central, level.institutions_asked_per_round)
    )
    assert level.sampling_amplification is False and level.unit.startswith("all the data")
    assert [r.central_epsilon for r in report.per_round] == [
        pytest.approx(central_epsilon(central, [3])),
        pytest.approx(level.epsilon),
    ]
    assert "Institution level" in report.statement and "Sample level" in report.statement


def test_with_central_dp_a_round_where_everyone_refuses_is_still_released_with_noise(
    federation,
):
    grid, source = federation(policy=PrivacyPolicy(max_epsilon=0.01))  # refuse at once
    central = CentralPrivacyConfig(enabled=True, noise_multiplier=1.0, clipping_norm=1.0)
    federation_config = FederationConfig(
        rounds=1, min_train=2, min_available=3, min_evaluate=0, fraction_evaluate=0.0
    )
    history = run_job(job(central_privacy=central, federation=federation_config), grid, source)
    assert history.rounds[0].trained == 0 and history.central_releases == [3]
    assert history.rounds[0].metrics["loss"] != history.initial_metrics["loss"]
