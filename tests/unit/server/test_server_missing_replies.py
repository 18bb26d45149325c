"""Replies that never come, or that the SuperLink sends for a node that went offline, are
recorded against the institution asked; a round below federation.min_train is not released
(without central DP) and says so (fault probe of issue 14)."""

from __future__ import annotations

import pytest

from confide.privacy.config import CentralPrivacyConfig, PrivacyConfig, TrainConfig
from confide.server.app import run
from confide.server.history import JobHistory
from confide.server.job import FederationConfig, JobConfig
from confide.tasks.config import DataConfig, TaskConfig

pytestmark = pytest.mark.usefixtures("inside_a_run")


def job(rounds: int = 1, **overrides: object) -> JobConfig:
    settings = {
        "task": TaskConfig(name="digits"),
        "data": DataConfig(test_fraction=0.2, validation_fraction=0.1),
        "train": TrainConfig(batch_size=64, lr=1.0),
        "privacy": PrivacyConfig(noise_multiplier=1.0),
    }
    return JobConfig.model_validate(settings | overrides)


def run_job(job_config: JobConfig, grid, source) -> JobHistory:  # type: ignore[no-untyped-def]
    history = JobHistory()
    run(job_config, grid, history=history, test_set=source.split().test, noise_seed=0)
    return history


def federation_of(**overrides: object) -> FederationConfig:
    settings: dict[str, object] = {
        "rounds": 1,
        "min_train": 2,
        "min_available": 3,
        "min_evaluate": 0,
        "fraction_evaluate": 0.0,
        "timeout": 60.0,
    }
    return FederationConfig.model_validate(settings | overrides)


def test_a_node_the_superlink_reports_offline_is_recorded_by_its_institutions_name(federation):
    grid, source = federation()
    grid.offline = {102}  # institution "2"'s node; the error comes from the SuperLink's id 1
    history = run_job(job(federation=federation_of()), grid, source)
    assert history.rejected == [
        {
            "institution": "2",
            "round": 1,
            "phase": "train",
            "reason": history.rejected[0]["reason"],
            "refused_by": "unanswered",
        }
    ]
    assert "Node Unavailable" in str(history.rejected[0]["reason"])
    assert history.rounds[0].trained == 2


def test_an_institution_that_never_replies_leaves_a_row_naming_the_timeout(federation):
    grid, source = federation()
    grid.silent = {102}
    history = run_job(
        job(federation=federation_of(min_evaluate=1, fraction_evaluate=1.0)), grid, source
    )
    rows = [(r["institution"], r["phase"], r["refused_by"]) for r in history.rejected]
    assert rows == [("2", "train", "unanswered"), ("2", "evaluate", "unanswered")]
    assert "no train reply within the round's timeout (federation.timeout 60 s)" in str(
        history.rejected[0]["reason"]
    )
    assert history.rounds[0].trained == 2


def test_a_round_with_fewer_usable_updates_than_min_train_is_not_aggregated(federation):
    grid, source = federation()
    grid.silent = {100, 101}
    history = run_job(job(rounds=2, federation=federation_of(rounds=2)), grid, source)
    first = history.rounds[0]
    assert first.trained == 0
    assert first.note is not None and "not aggregated: 1 usable update(s)" in first.note
    assert "min_train 2" in first.note
    # The global model did not move: it scores exactly as the initial one.
    assert first.metrics["loss"] == history.initial_metrics["loss"]
    assert {r["round"] for r in history.rejected} == {1, 2}
    # Institution 2 trained and spent in both rounds, though nothing was released.
    assert history.institutions["2"].rounds_trained == 2


def test_under_central_dp_a_round_below_min_train_is_released_and_says_so(federation):
    grid, source = federation()
    grid.silent = {100, 101}
    central = CentralPrivacyConfig(enabled=True, noise_multiplier=1.0, clipping_norm=1.0)
    history = run_job(job(central_privacy=central, federation=federation_of()), grid, source)
    first = history.rounds[0]
    assert history.central_releases == [3]
    assert first.note is not None and first.note.startswith("released with 1 usable update(s)")
    assert first.metrics["loss"] != history.initial_metrics["loss"]


def test_a_full_round_has_no_note_and_no_rows(federation):
    grid, source = federation()
    history = run_job(job(federation=federation_of()), grid, source)
    assert history.rejected == [] and history.rounds[0].note is None
