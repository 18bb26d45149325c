"""End to end through the real CLI: Flower's simulation engine on Ray, Opacus DP-SGD.

Three institutions, two rounds, DP on, on the digits data given as a CSV file that the
scenario names by a path relative to itself. The first run starts from empty ledgers and
runs from another folder; the second and third are each given a copy of the first one's
ledgers (`--state`): they continue each institution's spend and draw fresh noise (their
losses differ from the first run's). The third runs the scenario the second saved, from yet
another folder: it repeats the second exactly (same seed, same starting state).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from helpers import cli

from confide.privacy.accounting import epsilon
from confide.simulations.scenario import bundled_scenarios
from confide.tasks.datasets import load_digits

pytestmark = pytest.mark.slow
OVERRIDES = ("--rounds", "2", "--institutions", "3", "--seed", "7")


def _run(
    scenario: Path, out: Path, cwd: Path, *extra: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    cwd.mkdir(exist_ok=True)
    result = cli(
        "confide-simulate", "run", str(scenario), "--quiet", "--out", str(out), *extra,
        timeout=600, cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (directory,) = out.iterdir()
    return result, directory


@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory) -> Path:
    """The bundled digits-dp scenario with its data in a CSV file beside it, named by a
    relative path: `data/digits.csv`."""
    project = tmp_path_factory.mktemp("project")
    digits = load_digits()
    (project / "data").mkdir()
    header = ",".join([*(f"p{j}" for j in range(digits.x.shape[1])), "digit"])
    rows = [
        ",".join([*(f"{v:.4f}" for v in x), str(y)])
        for x, y in zip(digits.x, digits.y, strict=True)
    ]
    (project / "data" / "digits.csv").write_text("\n".join([header, *rows]) + "\n")
    bundled = bundled_scenarios()["digits-dp"].read_text()
    task = '[task]\nname = "digits"\n'
    assert task in bundled
    csv = '[task]\nname = "csv"\npath = "data/digits.csv"\nlabel_column = "digit"\n'
    (project / "digits-dp.toml").write_text(bundled.replace(task, csv))
    return project / "digits-dp.toml"


@pytest.fixture(scope="module")
def two_runs(scenario_file, tmp_path_factory):
    """The first run, one that continues its ledgers, and the second's saved scenario run
    again on another copy of the first run's ledgers."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    first = _run(scenario_file, tmp_path_factory.mktemp("run0"), elsewhere, *OVERRIDES)
    starts = []
    for copy in ("state1", "state2"):
        starts.append(tmp_path_factory.mktemp(copy) / "state")
        shutil.copytree(first[1] / "state", starts[-1])
    second = _run(
        scenario_file, tmp_path_factory.mktemp("run1"), elsewhere, *OVERRIDES,
        "--state", str(starts[0]),
    )  # fmt: skip
    saved = second[1] / "scenario.toml"
    third = _run(
        saved, tmp_path_factory.mktemp("run2"), tmp_path_factory.mktemp("another"),
        "--state", str(starts[1]),
    )  # fmt: skip
    return [first, second, third]


def test_run_writes_every_artefact(two_runs):
    _, directory = two_runs[0]
    assert directory.name.startswith("digits-dp-")
    for name in (
        "results.json",
        "privacy.json",
        "scenario.toml",
        "partitions.json",
        "metrics.png",
        "epsilon.png",
    ):
        assert (directory / name).stat().st_size > 0, name


def test_results_json_has_the_documented_shape(two_runs):
    _, directory = two_runs[0]
    results = json.loads((directory / "results.json").read_text())
    assert results["scenario"] == "digits-dp" and results["seed"] == 7
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for entry in results["rounds"]:
        assert set(entry) >= {"round", "accuracy", "loss", "epsilon_max", "seconds"}
        assert 0.0 <= entry["accuracy"] <= 1.0 and entry["seconds"] > 0
    assert results["rounds"][1]["epsilon_max"] > results["rounds"][0]["epsilon_max"] > 0
    final = results["final"]
    assert set(final) >= {"accuracy", "loss", "f1_macro", "epsilon_max", "delta"}
    assert final["delta"] == 1e-5
    assert final["accuracy"] > results["initial"]["accuracy"]
    institutions = results["institutions"]
    assert [i["id"] for i in institutions] == [0, 1, 2]
    for inst in institutions:
        assert set(inst) >= {
            "id",
            "examples",
            "epsilon",
            "delta",
            "noise_multiplier",
            "sample_rate",
            "steps",
            "accountant",
        }
        # Recompute the reported epsilon from the reported parameters.
        history = [(inst["noise_multiplier"], inst["sample_rate"], inst["steps"])]
        assert inst["epsilon"] == pytest.approx(epsilon(history, inst["delta"]), rel=1e-9)
        assert inst["rounds_trained"] == 2 and inst["accountant"] == "rdp"
    assert final["epsilon_max"] == max(i["epsilon"] for i in institutions)


def test_summary_prints_accuracy_and_each_epsilon(two_runs):
    result, directory = two_runs[0]
    results = json.loads((directory / "results.json").read_text())
    assert f"Final test accuracy {results['final']['accuracy']:.4f}" in result.stdout
    for inst in results["institutions"]:
        assert f"{inst['epsilon']:.3f}" in result.stdout


def test_resolved_scenario_records_the_overrides_and_the_data_file(two_runs, scenario_file):
    _, directory = two_runs[0]
    resolved = tomllib.loads((directory / "scenario.toml").read_text())
    assert resolved["federation"]["rounds"] == 2
    assert resolved["simulation"]["institutions"] == 3
    assert resolved["seed"] == 7
    # The file the run read, wherever the scenario is run from; no other task's settings.
    data = scenario_file.parent.resolve() / "data" / "digits.csv"
    assert resolved["task"] == {
        "name": "csv",
        "path": str(data),
        "label_column": "digit",
        "model": {"hidden": [64], "activation": "tanh"},
    }


# What legitimately differs between two runs from the same starting state: time, and where
# the ledgers are.
VARIES = ("seconds", "timing", "ledgers")


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in VARIES}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def test_a_saved_scenario_run_again_elsewhere_from_the_same_state_gives_the_same_numbers(
    two_runs,
):
    second, third = (
        json.loads((directory / "results.json").read_text()) for _, directory in two_runs[1:]
    )
    assert _without_timing(second) == _without_timing(third)
    assert second["final"]["accuracy"] > 0  # a run that trained, not two empty results


def test_a_run_that_continues_the_ledgers_draws_fresh_noise(two_runs):
    """Audit finding 2: with the same seed, a continuing run replayed the first run's batches
    and noise (identical losses round by round) while its ledger counted both runs."""
    first, second = (
        json.loads((directory / "results.json").read_text()) for _, directory in two_runs[:2]
    )
    for before, after in zip(first["rounds"], second["rounds"], strict=True):
        assert before["loss"] != after["loss"]


def test_the_second_run_continues_each_institutions_ledger(two_runs):
    import logging

    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    logging.getLogger("absl").setLevel(logging.ERROR)
    first, second = (
        json.loads((directory / "privacy.json").read_text())["sample_level"]["institutions"]
        for _, directory in two_runs[:2]
    )
    for before, after in zip(first, second, strict=True):
        assert before["dataset_epsilon"] == pytest.approx(before["epsilon"])
        run = (after["noise_multiplier"], after["sample_rate"], after["steps"])
        both = [run, run]  # two runs with the same terms on the same data
        assert after["dataset_epsilon"] == pytest.approx(epsilon(both, 1e-5), rel=1e-9)
        assert after["dataset_epsilon"] > after["epsilon"]
        # ... and an independent accountant (Google's dp-accounting) agrees within 1 %.
        accountant = RdpAccountant()
        sampled = dp_accounting.PoissonSampledDpEvent(run[1], dp_accounting.GaussianDpEvent(run[0]))
        accountant.compose(dp_accounting.SelfComposedDpEvent(sampled, 2 * run[2]))
        assert after["dataset_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=0.01)
        assert after["epsilon"] == pytest.approx(epsilon([run], 1e-5), rel=1e-9)


def test_the_run_saves_its_model_and_predict_reproduces_its_test_metrics(two_runs, scenario_file):
    from confide.server.model_file import read_card
    from confide.simulations.predict import predict

    _, directory = two_runs[0]
    results = json.loads((directory / "results.json").read_text())
    assert results["model"]["file"] == "model.safetensors"
    card = read_card(directory / "model.safetensors")
    assert card.weights.sha256 == results["model"]["sha256"]
    assert card.run.round == results["model"]["round"] == 2
    assert [row.id for row in card.privacy.institutions] == [0, 1, 2]
    assert all(row.data_commitment for row in card.privacy.institutions)
    # The card names the task's file but not where it is: it is given, and the run's
    # held-out split of it is scored again.
    assert card.task["path"] == "digits.csv"
    data = scenario_file.parent / "data" / "digits.csv"
    scored = predict(directory / "model.safetensors", data, test_split=True)
    assert scored.metrics is not None
    assert scored.metrics["accuracy"] == results["final"]["accuracy"]  # exactly
    assert scored.metrics["loss"] == pytest.approx(results["final"]["loss"], rel=1e-6)
    model = str(directory / "model.safetensors")
    printed = cli("confide-simulate", "predict", model, str(data), "--test-split")
    assert printed.returncode == 0, printed.stderr
    assert f"{results['final']['accuracy']:.6f}" in printed.stdout
    refused = cli("confide-simulate", "predict", model)
    assert refused.returncode == 2 and "--test-split" in refused.stderr


@pytest.fixture(scope="module")
def continued(two_runs, tmp_path_factory):
    """One more round from the first run's model: by default its ledgers are continued."""
    _, first = two_runs[0]
    _, directory = _run(
        first / "scenario.toml",
        tmp_path_factory.mktemp("run3"),
        tmp_path_factory.mktemp("continuing"),
        "--rounds", "1", "--init-model", str(first / "model.safetensors"),
    )  # fmt: skip
    return first, directory


def test_a_run_from_a_saved_model_starts_from_it_and_its_ledgers_keep_counting(continued):
    from confide.server.model_file import read_card

    first, directory = continued
    before = json.loads((first / "results.json").read_text())
    after = json.loads((directory / "results.json").read_text())
    assert after["initial"]["accuracy"] == before["final"]["accuracy"]
    assert Path(after["ledgers"]) == (first / "state").resolve()
    card = read_card(directory)
    (parent,) = card.lineage
    assert parent.sha256 == before["model"]["sha256"]
    assert parent.source == str(first / "model.safetensors")
    for old, new in zip(before["institutions"], after["institutions"], strict=True):
        assert new["dataset_epsilon"] > old["dataset_epsilon"] > 0
        assert new["dataset_epsilon"] > new["epsilon"]
