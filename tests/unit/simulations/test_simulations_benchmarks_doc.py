"""docs/benchmarks.md has two generated parts; regenerating one keeps the other."""

from __future__ import annotations

from confide.simulations.deployment_bench import (
    END,
    START,
    DeployedMeasurement,
    deployed_section,
    kept_section,
    replace_section,
)


def _section(seconds: float) -> str:
    measured = [
        DeployedMeasurement("train + federated evaluation", 3, [30.0, seconds, seconds], 70.0,
                            0.9, 7.99),
        DeployedMeasurement("train only", 3, [20.0, 9.0, 9.0], 40.0, 0.9, 7.99),
    ]  # fmt: skip
    return deployed_section(measured, 2.9)


def test_the_deployed_section_reports_the_median_of_rounds_after_the_first():
    section = _section(12.0)
    assert section.startswith(START) and section.endswith(END)
    assert "| train + federated evaluation | 12.0 | 30.0 |" in section
    assert "| train only | 9.0 | 20.0 |" in section


def test_replacing_the_deployed_section_keeps_the_simulation_numbers():
    simulated = "# Benchmarks\n\n| confide, DP on | 0.422 |\n"
    once = replace_section(simulated, _section(12.0))
    assert once.startswith(simulated.rstrip("\n")) and "| 12.0 |" in once
    twice = replace_section(once, _section(15.0))
    assert "| 12.0 |" not in twice and "| 15.0 |" in twice
    assert twice.count(START) == 1 and "| confide, DP on | 0.422 |" in twice


def test_a_rewritten_simulation_part_carries_the_deployed_section_over():
    old = replace_section("# Benchmarks\nold numbers\n", _section(12.0))
    kept = kept_section(old)
    assert kept is not None and kept_section("# Benchmarks\n") is None
    new = replace_section("# Benchmarks\nnew numbers\n", kept)
    assert "new numbers" in new and "old numbers" not in new and "| 12.0 |" in new


def test_the_deployed_section_states_each_target_and_whether_it_was_met():
    section = _section(7.5)  # train + evaluation 7.5 s (target 8), train only 9.0 s (5)
    assert "- target for train + federated evaluation: at most 8 s per round; measured " in section
    assert "7.5 s: met." in section
    assert "- target for train only: at most 5 s per round; measured 9.0 s: MISSED." in section


def test_the_many_institutions_part_says_whether_any_round_was_recorded_twice():
    from confide.simulations.deployment_bench import ManyMeasurement

    job = DeployedMeasurement("train only", 3, [40.0, 8.0, 9.0], 60.0, 0.8, 5.1, "77")
    many = ManyMeasurement(
        job=job,
        idle_mib=[600.0, 700.0],
        peak_mib=[650.0, 720.0],
        peak_total_mib=1300.0,
        rounds_recorded={"hospital-0": [1, 2, 3], "hospital-1": [1, 2, 2, 3]},
        roles_mib={"confide-client start": 100.0, "runner": 450.0, "SuperNode": 140.0},
        failed_tasks=0,
        copies_refused=1,
    )
    section = deployed_section([job], 2.0, many)
    assert "### 2 institutions on one host" in section
    assert "| rounds some ledger holds twice | 1 (a bug: each must be once) |" in section
    assert "| s/round (median r2..) | 8.5 |" in section
    assert "confide-client start 100, runner 450, SuperNode 140" in section
    assert section.endswith(END)
