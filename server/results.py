"""What a job leaves behind, in simulation and in deployment alike.

`results.json` (fields documented in the README), `privacy.json` (the privacy report, see
confide.privacy.report), the resolved job or scenario as TOML (so the run can be repeated),
`metrics.png` and, with DP, `epsilon.png`. Every file is written
atomically; NaN and infinity (a diverged model's loss) are written as null.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import tomli_w

from confide.common.files import write_atomic
from confide.privacy.config import PrivacyConfig
from confide.privacy.report import json_epsilon, privacy_report
from confide.server.history import JobHistory
from confide.server.job import JobConfig

RESULTS = "results.json"
PRIVACY = "privacy.json"


def median_after_first(seconds: list[float]) -> float:
    """Median round time without round 1, which pays start-up (Ray, or the first ClientApp
    processes in deployment)."""
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_number(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_number(item) for item in value]
    return value


def institution_row(
    identifier: int | str,
    privacy: PrivacyConfig,
    history: JobHistory,
    *,
    key: str,
    examples: int | None,
    declared_examples: int | None,
    validation_examples: int,
) -> dict[str, Any]:
    """One institution's entry in results.json; `key` names it in the job history.

    `examples` is its training set size where the coordinator knows it (a simulation), None in
    deployment, where only the declared size travels."""
    spend = history.institutions.get(key)
    dp = privacy.enabled
    if spend is not None and spend.declared_examples:
        declared_examples = spend.declared_examples  # as the institution's replies declared
    return {
        "id": identifier,
        "examples": examples,
        "declared_examples": declared_examples,
        "validation_examples": validation_examples,
        "rounds_trained": spend.rounds_trained if spend else 0,
        "epsilon": spend.epsilon if (spend and dp) else (0.0 if dp else None),
        "delta": privacy.delta if dp else None,
        "noise_multiplier": spend.noise_multiplier if (spend and dp) else None,
        "sample_rate": spend.sample_rate if (spend and dp) else None,
        "steps": spend.steps if spend else 0,
        "accountant": privacy.accountant if dp else None,
        "noise_generator": spend.noise_generator if (spend and dp) else None,
        # The institution's dataset over every job in its ledger (its accountant and delta).
        "dataset_epsilon": json_epsilon(spend.dataset_epsilon) if spend else None,
        "dataset_delta": spend.dataset_delta if spend else None,
        "dataset_accountant": spend.dataset_accountant if spend else None,
    }


def privacy_document(
    name: str,
    job: JobConfig,
    history: JobHistory,
    institutions: list[dict[str, Any]],
    *,
    simulated: bool,
) -> dict[str, Any]:
    """The privacy.json document of a finished job (see confide.privacy.report)."""
    rounds = [
        {"round": r.round, "epsilon_max": r.epsilon_max, "central_epsilon": r.central_epsilon}
        for r in history.rounds
    ]
    return privacy_report(
        name,
        job.privacy,
        job.train,
        job.central_privacy,
        institutions,
        rounds,
        history.central_releases,
        history.stopped,
        simulated=simulated,
    )


def build_results(
    name: str,
    job: JobConfig,
    history: JobHistory,
    institutions: list[dict[str, Any]],
    timing: dict[str, float],
    report: dict[str, Any],
) -> dict[str, Any]:
    """The results.json document of a finished job; `report` is its privacy document
    (`privacy_document`), summarised here."""
    dp = job.privacy.enabled
    central = report["institution_level"]
    privacy_summary = {
        "unit": "sample",
        "accountant": job.privacy.accountant if dp else None,
        "statement": report["statement"],
        "institution_level": (
            {"epsilon": central["epsilon"], "delta": central["delta"], "accountant": "rdp"}
            if central
            else None
        ),
        "report": PRIVACY,
    }
    final = history.rounds[-1]
    seconds = [r.seconds for r in history.rounds]
    return {
        "scenario": name,
        "seed": job.seed,
        "dp": dp,
        "rounds": [
            {
                "round": r.round,
                "accuracy": r.accuracy,
                "loss": r.loss,
                "f1_macro": r.f1_macro,
                "epsilon_max": r.epsilon_max if dp else None,
                "seconds": round(r.seconds, 4),
                "institutions_trained": r.trained,
                "federated_evaluation": r.federated_metrics,
                "central_epsilon": r.central_epsilon,
            }
            for r in history.rounds
        ],
        "initial": history.initial_metrics,
        "final": {
            "accuracy": final.accuracy,
            "loss": final.loss,
            "f1_macro": final.f1_macro,
            "epsilon_max": history.epsilon_max if dp else None,
            "delta": job.privacy.delta if dp else None,
            "metrics": final.metrics,
        },
        "privacy": privacy_summary,
        "institutions": institutions,
        "rejected_updates": history.rejected,
        "stopped": history.stopped,
        "timing": {
            "first_round_seconds": round(seconds[0], 4),
            "median_round_seconds": round(median_after_first(seconds), 4),
        }
        | {key: round(value, 3) for key, value in timing.items()},
    }


def _json(document: dict[str, Any]) -> str:
    return json.dumps(_json_number(document), indent=2, allow_nan=False) + "\n"


def write_results(
    directory: Path,
    results: dict[str, Any],
    history: JobHistory,
    config: tuple[str, dict[str, Any]],
    privacy: dict[str, Any],
) -> None:
    """Write `results`, the `privacy` report and the plots into `directory`; `config` is
    (file name, resolved config) saved as TOML next to them. results.json is written last:
    its presence means the run's folder is complete."""
    from confide.server.plots import plot_epsilon, plot_metrics

    directory.mkdir(parents=True, exist_ok=True)
    file_name, resolved = config
    write_atomic(directory / file_name, tomli_w.dumps(resolved))
    title = str(results["scenario"])
    plot_metrics(history, directory / "metrics.png", title)
    if results["dp"] or privacy["institution_level"]:
        plot_epsilon(history, directory / "epsilon.png", title, sample_level=results["dp"])
    write_atomic(directory / PRIVACY, _json(privacy))
    write_atomic(directory / RESULTS, _json(results))
