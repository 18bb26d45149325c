"""The terminal summary of a run, read from its results document, and the partition table."""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console

from confide.privacy.config import PrivacyConfig
from confide.server.history import JobHistory, RoundRecord
from confide.server.job import JobConfig
from confide.server.results import (
    Results,
    build_results,
    document_json,
    institution_row,
    privacy_document,
)
from confide.simulations.display import partition_table, summary
from confide.tasks.config import DataConfig, TaskConfig
from confide.tasks.splits import federate


def console() -> Console:
    return Console(file=io.StringIO(), width=200, no_color=True, highlight=False)


def text(shown: Console) -> str:
    assert isinstance(shown.file, io.StringIO)
    return shown.file.getvalue()


def results(*, institutions: int = 2, dp: bool = True, loss: float = 1.25) -> Results:
    """A finished simulated run of `institutions`, every one trained, institution 1 refused
    round 2 and its ledger is unbounded."""
    config = JobConfig(
        privacy=PrivacyConfig(target_epsilon=8.0) if dp else PrivacyConfig(enabled=False)
    )
    done = JobHistory(initial_metrics={"loss": 2.3, "accuracy": 0.1, "f1_macro": 0.05})
    for number in (1, 2):
        done.rounds.append(
            RoundRecord(
                round=number,
                metrics={"loss": loss, "accuracy": 0.8, "f1_macro": 0.75},
                epsilon_max=1.5 * number,
                seconds=40.0 if number == 1 else 0.5,
                trained=institutions,
            )
        )
    for index in range(institutions):
        spend = done.spend(str(index))
        spend.rounds_trained, spend.steps, spend.epsilon = 2, 10, 1.0 + index
        spend.noise_multiplier, spend.sample_rate = 1.2, 0.2
        spend.dataset_epsilon, spend.dataset_delta = (math.inf if index == 1 else 3.0), 1e-5
    done.rejected.append(
        {"institution": "1", "round": 2, "phase": "train", "reason": "limit", "refused_by": "x"}
    )
    rows = [
        institution_row(
            index,
            config.privacy,
            done,
            key=str(index),
            examples=100 + index,
            declared_examples=100,
            validation_examples=10,
        )
        for index in range(institutions)
    ]
    report = privacy_document("demo", config, done, institutions=rows, simulated=True)
    return build_results(
        "demo",
        config,
        done,
        institutions=rows,
        report=report,
        total_seconds=41.0,
        peak_rss_mb=1000.0,
        ledgers="state",
    )


def test_the_summary_shows_accuracy_privacy_per_institution_refusals_and_timing():
    shown = console()
    summary(shown, results(), "runs/demo")
    out = text(shown)
    assert "Final test accuracy 0.8000  loss 1.2500  macro-F1 0.7500" in out
    assert "Privacy (sample level, RDP accountant): max epsilon 2.000 at delta 1e-05" in out
    assert "3.000 @ 1e-05" in out and "unbounded" in out  # institutions 0 and 1's ledgers
    assert "1.200" in out and "0.2000" in out  # sigma, q
    assert "1 update(s) or replies were refused or failed; first: institution 1: limit" in out
    assert "2 rounds in 41.0s (first 40.0s with Ray start-up, then median 0.50s)" in out
    assert out.rstrip().endswith("Results: runs/demo")


def test_many_institutions_are_summarised_in_one_line():
    shown = console()
    summary(shown, results(institutions=25), "runs/demo")
    out = text(shown)
    assert "25 of 25 institutions trained; epsilon per institution: min 1.000, median 13.000" in out
    assert "Privacy spent per institution" not in out


def test_without_dp_the_summary_says_there_is_no_guarantee_and_shows_a_diverged_loss():
    shown = console()
    summary(shown, results(dp=False, loss=math.nan), "runs/demo")
    out = text(shown)
    assert "loss nan" in out
    assert "Privacy at sample level: none (DP-SGD off)" in out
    assert "max epsilon" not in out


def test_a_summary_of_a_results_file_read_back_is_the_same():
    built = results(loss=math.nan)
    first, second = console(), console()
    summary(first, built, "runs/demo")
    summary(second, Results.model_validate_json(document_json(built)), "runs/demo")
    assert text(first).replace("loss nan", "loss -") == text(second)


@pytest.mark.parametrize(("institutions", "full"), [(3, True), (25, False)])
def test_the_partition_table_lists_few_institutions_and_summarises_many(
    institutions: int, full: bool
) -> None:
    split = federate(TaskConfig(name="digits"), DataConfig(), institutions=institutions, seed=0)
    shown = console()
    partition_table(shown, split)
    out = text(shown)
    sizes = [row.examples for row in split.table]
    if full:
        assert "Data per institution" in out
        for row in split.table:
            assert " ".join(f"{count:>3}" for count in row.labels) in out
    else:
        assert f"{institutions} institutions; examples per institution: min {min(sizes)}" in out
