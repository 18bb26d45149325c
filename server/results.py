"""What a job leaves behind, in simulation and in deployment alike.

`results.json` (fields documented in the README), the resolved job or scenario as TOML (so the
run can be repeated), `metrics.png` and, with DP, `epsilon.png`. Every file is written
atomically; NaN and infinity (a diverged model's loss) are written as null.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import tomli_w

from confide.privacy.config import PrivacyConfig
from confide.server.history import JobHistory
from confide.server.job import JobConfig
from confide.tasks.files import write_atomic

RESULTS = "results.json"


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


def privacy_statement(privacy: PrivacyConfig, history: JobHistory, *, simulated: bool) -> str:
    if not privacy.enabled:
        return "No differential privacy: model updates are not protected by any (epsilon, delta)."
    noise = (
        "In this simulation the noise is seeded from the scenario seed for reproducibility; a "
        "deployed institution draws it from a secret source."
        if simulated
        else "Each institution drew its noise from its own secret source (OS CSPRNG)."
    )
    return (
        f"Sample-level DP-SGD at each institution: every institution's training data is "
        f"protected with (epsilon <= {history.epsilon_max:.3f}, delta = {privacy.delta:g}) "
        f"as computed by Opacus's {privacy.accountant.upper()} accountant over all rounds of "
        "this run. This bounds what the shared model updates reveal about any single training "
        "example; it does not hide an institution's participation, its example count, or its "
        f"local validation metrics. {noise}"
    )


def institution_row(
    identifier: int | str,
    privacy: PrivacyConfig,
    history: JobHistory,
    key: str,
    examples: int,
    validation_examples: int,
) -> dict[str, Any]:
    """One institution's entry in results.json; `key` names it in the job history."""
    spend = history.institutions.get(key)
    dp = privacy.enabled
    return {
        "id": identifier,
        "examples": examples,
        "validation_examples": validation_examples,
        "rounds_trained": spend.rounds_trained if spend else 0,
        "epsilon": spend.epsilon if (spend and dp) else (0.0 if dp else None),
        "delta": privacy.delta if dp else None,
        "noise_multiplier": spend.noise_multiplier if (spend and dp) else None,
        "sample_rate": spend.sample_rate if (spend and dp) else None,
        "steps": spend.steps if spend else 0,
        "accountant": privacy.accountant if dp else None,
    }


def build_results(
    name: str,
    job: JobConfig,
    history: JobHistory,
    institutions: list[dict[str, Any]],
    timing: dict[str, float],
    *,
    simulated: bool,
) -> dict[str, Any]:
    """The results.json document of a finished job."""
    dp = job.privacy.enabled
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
        "privacy": {
            "unit": "sample",
            "accountant": job.privacy.accountant if dp else None,
            "statement": privacy_statement(job.privacy, history, simulated=simulated),
        },
        "institutions": institutions,
        "rejected_updates": history.rejected,
        "timing": {
            "first_round_seconds": round(seconds[0], 4),
            "median_round_seconds": round(median_after_first(seconds), 4),
        }
        | {key: round(value, 3) for key, value in timing.items()},
    }


def write_results(
    directory: Path,
    results: dict[str, Any],
    history: JobHistory,
    config: tuple[str, dict[str, Any]],
) -> None:
    """Write `results` and its plots into `directory`; `config` is (file name, resolved
    config) saved as TOML next to them. results.json is written last: its presence means the
    run's folder is complete."""
    from confide.server.plots import plot_epsilon, plot_metrics

    directory.mkdir(parents=True, exist_ok=True)
    file_name, resolved = config
    write_atomic(directory / file_name, tomli_w.dumps(resolved))
    title = str(results["scenario"])
    plot_metrics(history, directory / "metrics.png", title)
    if results["dp"]:
        plot_epsilon(history, directory / "epsilon.png", title)
    document = json.dumps(_json_number(results), indent=2, allow_nan=False) + "\n"
    write_atomic(directory / RESULTS, document)
