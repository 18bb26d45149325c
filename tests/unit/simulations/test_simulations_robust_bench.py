"""`confide-simulate bench --robust`: its workloads are valid scenarios with the stated
settings, and its report says whether the bar held from the numbers it was given."""

from __future__ import annotations

import pytest

from confide.simulations.robust_bench import (
    ATTACKS,
    MARKERS,
    RULES,
    Cell,
    plan,
    robust_section,
    verdicts,
    workload,
)


def cell(attack: str, rule: str, accuracy: float, dp: bool = False) -> Cell:
    return Cell(
        attack=attack, rule=rule, dp=dp, accuracy=accuracy, median_round=0.5, first_round=9.0
    )


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("attack", ATTACKS)
def test_every_cell_is_a_valid_scenario_with_twenty_institutions_and_thirty_percent_attacking(
    attack, rule
):
    scenario = workload(attack=attack, rule=rule, dp=False, rounds=3)
    assert scenario.simulation.institutions == 20
    assert scenario.aggregation.rule == rule
    assert scenario.federation.rounds == 3 and scenario.federation.fraction_evaluate == 0.0
    if attack == "none":
        assert scenario.attack is None
    else:
        assert scenario.attack is not None and scenario.attack.kind == attack
        assert scenario.attack.fraction == 0.3


def test_the_plan_runs_every_attack_without_dp_and_the_bars_attacks_with_it():
    cells = plan()
    assert len(cells) == len(ATTACKS) * len(RULES) + 3 * len(RULES)
    assert {attack for attack, _, dp in cells if dp} == {"none", "sign-flip", "scaling"}


def test_the_bar_is_met_only_when_the_best_rule_is_within_three_points_and_fedavg_is_not():
    cells = [cell("none", "fedavg", 0.93), cell("sign-flip", "fedavg", 0.10)]
    cells += [cell("sign-flip", "median", 0.91), cell("scaling", "fedavg", 0.92)]
    cells += [cell("scaling", "median", 0.80)]
    lines = verdicts(cells)
    assert len(lines) == 2
    assert "sign-flip" in lines[0] and "best rule median 0.9100" in lines[0]
    assert lines[0].endswith("met") and not lines[0].endswith("NOT met")
    # Under scaling fedavg itself stays within the bar: the bar is not met.
    assert "best rule fedavg" in lines[1] and lines[1].endswith("NOT met")


def test_the_section_has_its_markers_and_a_row_per_attack_run():
    cells = [cell("none", rule, 0.9) for rule in RULES] + [cell("nan", "median", 0.88)]
    section = robust_section(cells, rounds=20)
    assert section.startswith(MARKERS[0]) and section.endswith(MARKERS[1])
    assert "| none | 0.9000 | 0.9000 |" in section
    assert "| nan | - | 0.8800 | - |" in section
    assert "### Final test accuracy, DP on" not in section  # no DP-on cell was given


def test_a_run_that_ended_without_a_model_is_shown_and_explained_not_dropped():
    failed = Cell(
        attack="nan",
        rule="krum",
        dp=False,
        accuracy=None,
        median_round=None,
        first_round=None,
        failed="no institution delivered a usable update",
    )
    section = robust_section([cell("nan", "median", 0.9), failed], rounds=15)
    assert "| nan | - | 0.9000 | - | no model |" in section
    assert "- nan / krum / DP off: no institution delivered a usable update" in section
