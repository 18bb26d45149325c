"""results.json and privacy.json built from a job's history: the fields and their order, null for
NaN and infinity, what only a simulation writes, and that each file reads back into its model.

The histories here are written by hand (what the strategy records), so no job runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from confide.privacy.config import CentralPrivacyConfig, PrivacyConfig
from confide.privacy.report import PrivacyReport, SampleLevelOff
from confide.server.history import InstitutionSpend, JobHistory, RoundRecord
from confide.server.job import JobConfig
from confide.server.results import (
    PRIVACY,
    RESULTS,
    InstitutionRow,
    Results,
    build_results,
    document_json,
    institution_row,
    privacy_document,
    write_results,
)

TOP_LEVEL = [
    "scenario",
    "seed",
    "dp",
    "rounds",
    "initial",
    "final",
    "privacy",
    "institutions",
    "rejected_updates",
    "stopped",
    "timing",
]


def metrics(accuracy: float, loss: float) -> dict[str, float]:
    return {"loss": loss, "accuracy": accuracy, "f1_macro": accuracy / 2}


def history(*, loss: float = 1.5, central: bool = False) -> JobHistory:
    """Two rounds of hospital-a and hospital-b; hospital-b refused round 2."""
    done = JobHistory(initial_metrics=metrics(0.1, 2.3))
    for number, (accuracy, trained) in enumerate([(0.5, 2), (0.6, 1)], start=1):
        done.rounds.append(
            RoundRecord(
                round=number,
                metrics=metrics(accuracy, loss if number == 2 else 2.0),
                epsilon_max=float(number),
                seconds=10.123456 if number == 1 else 0.51,
                trained=trained,
                epsilons={"hospital-a": float(number)}
                | ({"hospital-b": 1.0} if trained == 2 else {}),
                central_epsilon=0.5 * number if central else None,
            )
        )
    if central:
        done.central_releases.extend([2, 2])
    a, b = done.spend("hospital-a"), done.spend("hospital-b")
    a.declared_examples, a.rounds_trained, a.epsilon, a.steps = 300, 2, 2.0, 10
    a.noise_multiplier, a.sample_rate, a.noise_generator = 1.1, 0.2, "os-csprng"
    a.dataset_epsilon, a.dataset_delta, a.dataset_accountant = 5.0, 1e-5, "rdp"
    b.declared_examples, b.rounds_trained, b.epsilon, b.steps = 200, 1, 1.0, 5
    b.dataset_epsilon, b.dataset_delta, b.dataset_accountant = math.inf, 1e-5, "rdp"
    done.rejected.append(
        {
            "institution": "hospital-b",
            "round": 2,
            "phase": "train",
            "reason": "its limit",
            "refused_by": "institution",
        }
    )
    return done


def job(*, dp: bool = True, central: bool = False) -> JobConfig:
    return JobConfig(
        seed=3,
        privacy=PrivacyConfig(target_epsilon=8.0) if dp else PrivacyConfig(enabled=False),
        central_privacy=CentralPrivacyConfig(enabled=central, noise_multiplier=2.0),
    )


def deployed_rows(config: JobConfig, done: JobHistory) -> list[InstitutionRow]:
    return [
        institution_row(
            key,
            config.privacy,
            done,
            key=key,
            examples=None,
            declared_examples=spend.declared_examples or None,
            validation_examples=spend.validation_examples,
        )
        for key, spend in sorted(done.institutions.items())
    ]


def documents(
    config: JobConfig, done: JobHistory, **simulation: object
) -> tuple[Results, PrivacyReport]:
    rows = deployed_rows(config, done)
    report = privacy_document("job-a", config, done, institutions=rows, simulated=False)
    results = build_results(
        "job-a",
        config,
        done,
        institutions=rows,
        report=report,
        total_seconds=12.34567,
        **simulation,  # type: ignore[arg-type]
    )
    return results, report


def test_a_deployed_results_file_has_the_documented_fields_in_order_and_reads_back():
    results, _ = documents(job(), history())
    text = document_json(results)
    written = json.loads(text)
    assert list(written) == [*TOP_LEVEL, "model"]  # no `ledgers`: a simulation's only
    assert written["model"] is None  # written by write_results, with the model's files
    assert list(written["timing"]) == [
        "first_round_seconds",
        "median_round_seconds",
        "total_seconds",
    ]
    assert written["timing"]["total_seconds"] == 12.346
    assert [r["seconds"] for r in written["rounds"]] == [10.1235, 0.51]
    assert Results.model_validate_json(text) == results


def test_a_simulation_adds_its_peak_memory_and_ledgers():
    results, _ = documents(job(), history(), peak_rss_mb=2000.12345, ledgers="/runs/x/state")
    written = json.loads(document_json(results))
    assert list(written) == [*TOP_LEVEL, "ledgers", "model"]
    assert written["ledgers"] == "/runs/x/state"
    assert written["timing"]["peak_rss_mb"] == 2000.123


def test_a_diverged_loss_is_written_as_null_and_read_back_as_none():
    results, _ = documents(job(), history(loss=math.nan))
    text = document_json(results)
    assert "NaN" not in text
    back = Results.model_validate_json(text)
    assert back.final.loss is None and back.rounds[1].loss is None
    assert back.final.metrics["loss"] is None
    assert back.rounds[0].loss == 2.0


def test_rows_carry_each_institutions_spend_and_its_unbounded_ledger():
    results, report = documents(job(), history())
    a, b = results.institutions
    assert (a.id, a.examples, a.declared_examples, a.epsilon, a.steps) == (
        "hospital-a",
        None,
        300,
        2.0,
        10,
    )
    assert (a.noise_multiplier, a.sample_rate, a.accountant) == (1.1, 0.2, "rdp")
    assert b.dataset_epsilon == "unbounded"
    assert json.loads(document_json(results))["institutions"][1]["dataset_epsilon"] == "unbounded"
    assert [row.id for row in report.sample_level.institutions] == ["hospital-a", "hospital-b"]
    assert results.final.epsilon_max == 2.0 and results.final.delta == 1e-5


def test_an_institution_that_never_trained_has_zero_epsilon_with_dp_and_none_without():
    done = history()
    with_dp = institution_row(
        7,
        job().privacy,
        done,
        key="7",
        examples=40,
        declared_examples=40,
        validation_examples=4,
    )
    without = institution_row(
        7,
        job(dp=False).privacy,
        done,
        key="7",
        examples=40,
        declared_examples=40,
        validation_examples=4,
    )
    assert (with_dp.epsilon, with_dp.rounds_trained, with_dp.steps) == (0.0, 0, 0)
    assert without.epsilon is None and without.accountant is None and without.delta is None


def test_refusals_are_listed_as_the_strategy_recorded_them():
    results, _ = documents(job(), history())
    (refused,) = results.rejected_updates
    assert refused.model_dump() == {
        "institution": "hospital-b",
        "round": 2,
        "phase": "train",
        "reason": "its limit",
        "refused_by": "institution",
    }


def test_without_dp_no_sample_level_epsilon_is_reported_anywhere():
    results, report = documents(job(dp=False), history())
    assert not results.dp and results.privacy.accountant is None
    assert results.final.epsilon_max is None and results.final.delta is None
    assert all(r.epsilon_max is None for r in results.rounds)
    assert all(r.epsilon_max is None for r in report.per_round)
    assert isinstance(report.sample_level, SampleLevelOff)


def test_central_dp_is_summarised_from_the_privacy_report():
    results, report = documents(job(central=True), history(central=True))
    assert report.institution_level is not None
    assert report.institution_level.institutions_asked_per_round == [2, 2]
    summary = results.privacy.institution_level
    assert summary is not None
    assert (summary.epsilon, summary.delta, summary.accountant) == (1.0, 1e-5, "rdp")
    assert [r.central_epsilon for r in results.rounds] == [0.5, 1.0]


@pytest.mark.parametrize(
    ("dp", "central", "plotted"), [(True, False, True), (False, True, True), (False, False, False)]
)
def test_the_folder_holds_both_documents_the_config_and_the_plots(
    tmp_path: Path, dp: bool, central: bool, plotted: bool
) -> None:
    config = job(dp=dp, central=central)
    done = history(central=central)
    results, report = documents(config, done)
    write_results(tmp_path, results, done, config=("job.toml", {"seed": 3}), privacy=report)
    assert Results.model_validate_json((tmp_path / RESULTS).read_text()) == results
    assert PrivacyReport.model_validate_json((tmp_path / PRIVACY).read_text()) == report
    assert (tmp_path / "job.toml").read_text() == "seed = 3\n"
    assert (tmp_path / "metrics.png").is_file()
    assert (tmp_path / "epsilon.png").is_file() == plotted


def test_written_documents_validate_against_the_published_schemas():
    import jsonschema

    root = Path(__file__).resolve().parents[3] / "docs" / "schemas"
    results, report = documents(job(central=True), history(loss=math.inf, central=True))
    for name, document in ((RESULTS, results), (PRIVACY, report)):
        schema = json.loads((root / name).read_text())
        jsonschema.validate(json.loads(document_json(document)), schema)
    with pytest.raises(jsonschema.ValidationError):
        broken = json.loads(document_json(results)) | {"unknown": 1}
        jsonschema.validate(broken, json.loads((root / RESULTS).read_text()))


def test_the_round_records_stay_mutable_for_the_strategy():
    done = JobHistory()
    spend = done.spend("a")
    spend.epsilon = 3.0
    spend.rounds_trained += 1
    assert done.spend("a") is spend and done.epsilon_max == 3.0
    assert isinstance(spend, InstitutionSpend)
    record = RoundRecord(
        round=1, metrics=metrics(0.7, 0.9), epsilon_max=3.0, seconds=1.0, trained=1
    )
    done.rounds.append(record)
    done.stopped = "why"
    assert (record.accuracy, record.loss, record.f1_macro) == (0.7, 0.9, 0.35)
    with pytest.raises(ValueError, match="unknown"):
        RoundRecord(round=1, metrics={}, epsilon_max=0.0, seconds=0.0, trained=0, unknown=1)  # type: ignore[call-arg]


def test_submit_reports_a_finished_run_from_its_results_file(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from confide.server.cli import _report
    from confide.server.settings import StateDir

    state = StateDir(tmp_path)
    results, _ = documents(job(central=True), history(central=True))
    folder = state.runs / "run-7"
    folder.mkdir(parents=True)
    (folder / RESULTS).write_text(document_json(results))
    assert _report(state, 7) is False  # hospital-b refused a round
    out = capsys.readouterr().out
    assert "run 7: final accuracy 0.6000, max epsilon 2.000 at delta 1e-05" in out
    assert "institutions' ledgers, every job so far: max epsilon unbounded" in out
    assert "institution level (central DP): epsilon 1.000 at delta 1e-05" in out
    assert "hospital-b refused 1 message(s) of this run; last reason: its limit" in out
    assert _report(state, 8) is None  # no results
    assert "run 8 wrote no results" in capsys.readouterr().err


def test_submit_reports_a_complete_run_without_refusals_as_complete(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from confide.server.cli import _report
    from confide.server.settings import StateDir

    state = StateDir(tmp_path)
    done = history()
    done.rejected.clear()
    done.institutions["hospital-b"].dataset_epsilon = 4.5
    results, _ = documents(job(), done)
    (state.runs / "run-1").mkdir(parents=True)
    (state.runs / "run-1" / RESULTS).write_text(document_json(results))
    assert _report(state, 1) is True
    assert "every job so far: max epsilon 5.000" in capsys.readouterr().out


def test_an_unbounded_epsilon_is_written_as_null_and_both_documents_read_back():
    # Found in review: an institution may report epsilon = inf (nothing bounds it), and the
    # documents, which write it as null, refused to read themselves back.
    done = history(central=True)
    done.spend("hospital-a").epsilon = math.inf
    results, report = documents(job(central=True), done)
    results_text, report_text = document_json(results), document_json(report)
    assert "Infinity" not in results_text + report_text
    back = PrivacyReport.model_validate_json(report_text)
    assert back.sample_level.epsilon_max is None  # type: ignore[union-attr]
    assert "epsilon <= inf" in back.statement
    Results.model_validate_json(results_text)


def test_privacy_json_names_the_released_rule_and_each_releases_sensitivity():
    """Review finding: under a robust rule privacy.json described fedavg's sum; it must say
    which rule was released and with what sensitivity, so the noise can be recomputed."""
    from confide.privacy.config import CentralPrivacyConfig
    from confide.server.aggregation import aggregation_rule
    from confide.server.history import JobHistory
    from confide.server.job import AggregationConfig, FederationConfig, JobConfig
    from confide.server.results import privacy_document

    job = JobConfig(
        central_privacy=CentralPrivacyConfig(enabled=True),
        aggregation=AggregationConfig(rule="median"),
        federation=FederationConfig(min_train=2),
    )
    history = JobHistory(central_releases=[5, 4])
    level = privacy_document("j", job, history, institutions=[], simulated=True).institution_level
    assert level is not None and level.aggregation_rule == "median"
    rule = aggregation_rule(job.aggregation)
    assert level.sensitivity_per_round == [rule.sensitivity(5), rule.sensitivity(4)]
    assert level.sensitivity_per_round[0] > 2.0  # 2B with B > 1: not fedavg's 1
    fedavg = privacy_document(
        "j",
        JobConfig(central_privacy=CentralPrivacyConfig(enabled=True)),
        history,
        institutions=[],
        simulated=True,
    )
    assert fedavg.institution_level is not None
    assert fedavg.institution_level.sensitivity_per_round == [1.0, 1.0]
