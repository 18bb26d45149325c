"""Attacks and faults end to end through `confide-simulate run` (Flower's engine on Ray).

Attack: 10 institutions, 3 of them (30 %) sign-flip attackers sending w_t - 4 Delta, 3 rounds,
no DP. Measured here (seeds 0 and 1): FedAvg falls to chance (0.03-0.09) while the median
keeps 0.87-0.90 against its clean twin's 0.93; the assertions leave wide margins.

Faults (with the same attack in the same simulation, to spare a Ray start): 5 institutions,
2 of them attacking, 3 rounds, each fault at 0.2: the recorded events are the seeded
schedule, and what the coordinator saw (updates counted, refusals, ledgers) matches each
event's kind. (That FedAvg follows the attackers is measured by `confide-simulate bench
--robust`, docs/benchmarks.md.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import cli

from confide.privacy.ledger import Ledger
from confide.simulations.attack import AttackConfig, choose_attackers
from confide.simulations.faults import FaultPlan, FaultsConfig

pytestmark = pytest.mark.slow

COMMON = """
seed = 0
[simulation]
institutions = {institutions}
[task]
name = "digits"
model = {{ hidden = [64], activation = "tanh" }}
[data]
partition = {{ scheme = "iid" }}
[train]
local_epochs = 3
batch_size = 16
lr = 0.5
[privacy]
enabled = false
[federation]
rounds = 3
fraction_evaluate = 0.0
min_train = 1
min_evaluate = 0
min_available = {institutions}
"""
ATTACK = {"kind": "sign-flip", "fraction": 0.3, "scale": 4.0}


def _run(tmp_path: Path, name: str, text: str, *flags: str) -> tuple[str, dict]:
    scenario = tmp_path / f"{name}.toml"
    scenario.write_text(f'name = "{name}"\n{text}')
    out = tmp_path / f"out-{name}"
    result = cli(
        "confide-simulate", "run", str(scenario), "--quiet", "--out", str(out), *flags,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (directory,) = out.iterdir()
    return result.stdout, json.loads((directory / "results.json").read_text())


ATTACK_TABLE = '[attack]\nkind = "sign-flip"\nfraction = 0.3\nscale = 4.0\n'


def test_the_median_keeps_its_accuracy_under_a_30_percent_attack(tmp_path):
    common = COMMON.format(institutions=10) + ATTACK_TABLE
    output, median = _run(tmp_path, "median", common + '[aggregation]\nrule = "median"\n')

    attackers = choose_attackers(AttackConfig.model_validate(ATTACK), institutions=10, seed=0)
    record = median["attack"]
    assert record["institutions"] == [str(index) for index in attackers] and len(attackers) == 3
    assert (record["kind"], record["scale"], record["chosen"], record["fraction"]) == (
        "sign-flip",
        4.0,
        "drawn",
        0.3,
    )
    clean = record["clean_accuracy"]
    accuracy = median["final"]["accuracy"]
    assert clean > 0.8 and accuracy > 0.7 and accuracy > clean - 0.15
    assert record["accuracy_cost"] == pytest.approx(clean - accuracy)
    assert f"under sign-flip by 3 of 10 institutions; clean {clean:.3f}: cost" in output
    # Attackers' updates are finite: the coordinator counts them (the median outvotes them).
    assert median["rejected_updates"] == [] and "faults" not in median


def test_faults_are_the_seeded_schedule_and_the_coordinator_sees_each_as_it_would(tmp_path):
    faults = {"dropout": 0.2, "straggler": 0.2, "crash": 0.2}
    table = "[faults]\n" + "".join(f"{kind} = {rate}\n" for kind, rate in faults.items())
    text = COMMON.format(institutions=5) + table + ATTACK_TABLE
    _, results = _run(tmp_path, "faults", text, "--no-baseline")
    attackers = choose_attackers(AttackConfig.model_validate(ATTACK), institutions=5, seed=0)
    assert results["attack"]["institutions"] == [str(index) for index in attackers]
    assert results["attack"]["clean_accuracy"] is None  # --no-baseline

    names = [str(index) for index in range(5)]
    plan = FaultPlan.of(FaultsConfig.model_validate(faults), seed=0)
    expected = [e.model_dump() for e in plan.schedule(rounds=3, institutions=names)]
    record = results["faults"]
    assert record["events"] == expected and record["clean_accuracy"] is None
    assert {event["kind"] for event in expected} == {"dropout", "straggler", "crash"}
    # Every institution was asked every round; a faulty one's update never counted.
    for entry in results["rounds"]:
        met = [e for e in expected if e["round"] == entry["round"]]
        assert entry["institutions_trained"] == 5 - len(met)
    refused = {(r["round"], r["institution"]): r for r in results["rejected_updates"]}
    assert set(refused) == {(e["round"], e["institution"]) for e in expected}
    for event in expected:
        row = refused[event["round"], event["institution"]]
        crashed = event["kind"] == "crash"
        assert row["refused_by"] == ("institution" if crashed else "unanswered"), row
        assert ("crashed in round" in row["reason"]) == crashed
    # A straggler trained and recorded its spend; a dropout and a crash spent nothing.
    state = Path(results["ledgers"])
    for row in results["institutions"]:
        kinds = [e["kind"] for e in expected if e["institution"] == str(row["id"])]
        assert row["rounds_trained"] == 3 - len(kinds)
        ledger = Ledger(state / f"institution-{row['id']}")
        spends = [e for e in ledger.entries() if e.kind == "spend"] if ledger.exists() else []
        assert len(spends) == 3 - kinds.count("dropout") - kinds.count("crash")
