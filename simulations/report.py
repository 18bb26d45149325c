"""What a simulation leaves behind: results.json, the resolved scenario, partitions, plots."""

from __future__ import annotations

import json
import math
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w

from confide.server.history import JobHistory
from confide.simulations.engine import SimulationOutcome
from confide.simulations.scenario import ScenarioConfig
from confide.tasks.files import write_atomic

RESULTS = "results.json"
SCENARIO = "scenario.toml"
PARTITIONS = "partitions.json"


def run_directory(root: Path, scenario: ScenarioConfig) -> Path:
    """`<root>/<scenario>-<UTC timestamp>`, made unique if two runs start in one second."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        suffix = f"-{attempt}" if attempt else ""
        path = root / f"{scenario.name}-{stamp}{suffix}"
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise OSError(f"1000 run folders for {scenario.name} in one second under {root}")


def median_after_first(seconds: list[float]) -> float:
    """Median round time without round 1, which pays Ray's start-up."""
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def _json_number(value: Any) -> Any:
    """NaN and infinity (a diverged model's loss) are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_number(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_number(item) for item in value]
    return value


def privacy_statement(scenario: ScenarioConfig, history: JobHistory) -> str:
    privacy = scenario.privacy
    if not privacy.enabled:
        return "No differential privacy: model updates are not protected by any (epsilon, delta)."
    return (
        f"Sample-level DP-SGD at each institution: every institution's training data is "
        f"protected with (epsilon <= {history.epsilon_max:.3f}, delta = {privacy.delta:g}) "
        f"as computed by Opacus's {privacy.accountant.upper()} accountant over all rounds of "
        "this run. This bounds what the shared model updates reveal about any single training "
        "example; it does not hide an institution's participation, its example count, or its "
        "local validation metrics. In this simulation the noise is seeded from the scenario "
        "seed for reproducibility; a deployed institution draws it from a secret source."
    )


def build_results(scenario: ScenarioConfig, outcome: SimulationOutcome) -> dict[str, Any]:
    history, split = outcome.history, outcome.split
    dp = scenario.privacy.enabled
    final = history.rounds[-1]
    institutions = []
    for index, local in enumerate(split.institutions):
        spend = history.institutions.get(str(index))
        institutions.append(
            {
                "id": index,
                "examples": len(local.train),
                "validation_examples": len(local.validation),
                "rounds_trained": spend.rounds_trained if spend else 0,
                "epsilon": spend.epsilon if (spend and dp) else (0.0 if dp else None),
                "delta": scenario.privacy.delta if dp else None,
                "noise_multiplier": spend.noise_multiplier if (spend and dp) else None,
                "sample_rate": spend.sample_rate if (spend and dp) else None,
                "steps": spend.steps if spend else 0,
                "accountant": scenario.privacy.accountant if dp else None,
            }
        )
    return {
        "scenario": scenario.name,
        "seed": scenario.seed,
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
            }
            for r in history.rounds
        ],
        "initial": history.initial_metrics,
        "final": {
            "accuracy": final.accuracy,
            "loss": final.loss,
            "f1_macro": final.f1_macro,
            "epsilon_max": history.epsilon_max if dp else None,
            "delta": scenario.privacy.delta if dp else None,
            "metrics": final.metrics,
        },
        "privacy": {
            "unit": "sample",
            "accountant": scenario.privacy.accountant if dp else None,
            "statement": privacy_statement(scenario, history),
        },
        "institutions": institutions,
        "rejected_updates": history.rejected,
        "timing": {
            "total_seconds": round(outcome.seconds, 3),
            "first_round_seconds": round(history.rounds[0].seconds, 4),
            "median_round_seconds": round(
                median_after_first([r.seconds for r in history.rounds]), 4
            ),
            "peak_rss_mb": round(outcome.peak_rss_bytes / 2**20, 1),
        },
    }


def write_run(
    directory: Path, scenario: ScenarioConfig, outcome: SimulationOutcome
) -> dict[str, Any]:
    """Write every artefact of a finished run into `directory`; return the results dict."""
    history, split = outcome.history, outcome.split
    results = build_results(scenario, outcome)
    resolved = scenario.model_dump(mode="json", exclude_none=True)
    write_atomic(directory / SCENARIO, tomli_w.dumps(resolved))
    write_atomic(directory / PARTITIONS, json.dumps(split.table, indent=1) + "\n")
    from confide.simulations.plots import plot_epsilon, plot_metrics

    plot_metrics(history, directory / "metrics.png", scenario.name)
    if scenario.privacy.enabled:
        plot_epsilon(history, directory / "epsilon.png", scenario.name)
    write_atomic(
        directory / RESULTS, json.dumps(_json_number(results), indent=2, allow_nan=False) + "\n"
    )
    return results
