"""`confide-simulate bench --robust`: attacks x aggregation rules (x DP off/on) on digits.

The workload is the `digits-dp` scenario with 20 virtual institutions, of which 30% (6) attack
(`[attack] fraction = 0.3`, chosen from the seed), and no federated evaluation: every cell of
the table is the test accuracy of the final global model of one simulation, and the time of
its rounds. The rules' parameters are fixed for the whole table, public, and set as their
papers ask for 6 attackers where the rule allows it:

- `trimmed-mean`: beta = 0.3 (6 values cut at each end of every coordinate);
- `krum`, `multi-krum`: f = 6 (Blanchard et al. need n >= 2f + 3 = 15; multi-krum keeps
  m = n - f);
- `bulyan`: f = 4, the most 20 institutions allow (El Mhamdi et al. need n >= 4f + 3 = 19):
  Bulyan is not defined for 30% attackers, and the table shows what it does beyond that;
- `federation.min_train` is each rule's minimum (at least 2).

The `nan` attack's updates are refused by the coordinator's update check, which leaves 14
usable updates: fewer than Krum, Multi-Krum and Bulyan need with these parameters, so those
rounds are not aggregated (the model stays where it started) — what a deployment with these
settings would do. Sign-flip and scaling use scale 10 (w_t - 10 d and w_t + 10 d, d the honest
change); the other attacks their defaults.

The bar the issue sets: with sign-flip or scaling attackers, the best rule stays within 3
points of the clean accuracy (FedAvg without attackers) while FedAvg does not. The report
says, for each of the two, whether it held in this run.
"""

from __future__ import annotations

import platform
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from confide.common.files import write_atomic
from confide.server.results import median_after_first
from confide.simulations.deployment_bench import replace_section
from confide.simulations.engine import SimulationError, run_scenario
from confide.simulations.runner import RunError
from confide.simulations.scenario import ScenarioConfig, ScenarioError, load_scenario

MARKERS = ("<!-- robust-bench:start -->", "<!-- robust-bench:end -->")
BASE = "digits-dp"
INSTITUTIONS = 20
FRACTION = 0.3
CLEAN = "none"
ATTACKS = (CLEAN, "sign-flip", "scaling", "noise", "label-flip", "nan")
# The bar is about these two; with DP on only they (and the clean row) are run.
BAR_ATTACKS = ("sign-flip", "scaling")
RULES = ("fedavg", "median", "trimmed-mean", "krum", "multi-krum", "bulyan")
SCALED = {"sign-flip": 10.0, "scaling": 10.0}
TRIM_FRACTION = 0.3
# f as the papers ask (at least the attackers), except Bulyan, which needs n >= 4f + 3.
BYZANTINE = {"krum": 6, "multi-krum": 6, "bulyan": 4}
BAR_POINTS = 3.0


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One simulation: its final test accuracy and round times, or why it ended without a
    model (`failed`: e.g. no round had enough usable updates to be aggregated)."""

    attack: str
    rule: str
    dp: bool
    accuracy: float | None
    median_round: float | None
    first_round: float | None
    failed: str | None = None


def workload(*, attack: str, rule: str, dp: bool, rounds: int, seed: int = 0) -> ScenarioConfig:
    """The scenario of one cell (ScenarioError if the rule or attack is unknown)."""
    aggregation: dict[str, Any] = {"rule": rule, "trim_fraction": TRIM_FRACTION}
    if rule in BYZANTINE:
        aggregation["byzantine"] = BYZANTINE[rule]
    overrides: dict[str, Any] = {
        "name": f"robust-{attack}-{rule}-{'dp' if dp else 'nodp'}",
        "seed": seed,
        "simulation": {"institutions": INSTITUTIONS},
        "privacy": {"enabled": dp},
        "aggregation": aggregation,
        "federation": {
            "rounds": rounds,
            "min_available": INSTITUTIONS,
            "min_train": min_train(rule),
            "min_evaluate": 0,
            "fraction_evaluate": 0.0,
        },
    }
    if attack != CLEAN:
        table: dict[str, Any] = {"kind": attack, "fraction": FRACTION}
        if attack in SCALED:
            table["scale"] = SCALED[attack]
        overrides["attack"] = table
    return load_scenario(BASE, overrides)


def min_train(rule: str) -> int:
    """The fewest updates `rule` aggregates with the table's parameters (at least 2)."""
    from confide.server.aggregation import aggregation_rule
    from confide.server.job import AggregationConfig

    settings = AggregationConfig(
        rule=rule, trim_fraction=TRIM_FRACTION, byzantine=BYZANTINE.get(rule, 1)
    )
    return max(2, aggregation_rule(settings).minimum_updates)


def measure(scenario: ScenarioConfig, *, attack: str, rule: str) -> Cell:
    """One cell; a simulation that ends without a model (SimulationError) is a cell too."""
    try:
        outcome = run_scenario(scenario)
    except SimulationError as error:
        failed = str(error).splitlines()[0]
        return Cell(
            attack=attack,
            rule=rule,
            dp=scenario.privacy.enabled,
            accuracy=None,
            median_round=None,
            first_round=None,
            failed=failed,
        )
    seconds = [record.seconds for record in outcome.history.rounds]
    return Cell(
        attack=attack,
        rule=rule,
        dp=scenario.privacy.enabled,
        accuracy=outcome.history.rounds[-1].accuracy,
        median_round=median_after_first(seconds),
        first_round=seconds[0],
    )


def plan() -> list[tuple[str, str, bool]]:
    """(attack, rule, dp) of every cell: all attacks without DP, the clean and the bar's
    attacks with DP (the rest would double the run for rows the bar does not read)."""
    cells = [(attack, rule, False) for attack in ATTACKS for rule in RULES]
    cells += [(attack, rule, True) for attack in (CLEAN, *BAR_ATTACKS) for rule in RULES]
    return cells


def run_robust_benchmark(rounds: int, output: Path, *, console: Console) -> list[Cell]:
    """Run every cell, print the tables and update the robust section of OUTPUT."""
    cells = []
    planned = plan()
    for index, (attack, rule, dp) in enumerate(planned, start=1):
        label = f"{attack} / {rule} / DP {'on' if dp else 'off'}"
        console.print(f"robust benchmark {index}/{len(planned)}: {label} ...")
        try:
            scenario = workload(attack=attack, rule=rule, dp=dp, rounds=rounds)
            cells.append(measure(scenario, attack=attack, rule=rule))
        except (ScenarioError, SimulationError) as error:
            raise RunError(f"{label}: {error}") from None
    for dp in (False, True):
        _print(console, cells, dp=dp)
    for line in verdicts(cells):
        console.print(line)
    section = robust_section(cells, rounds)
    previous = output.read_text() if output.is_file() else "# Benchmarks\n"
    try:
        write_atomic(output, replace_section(previous, section, MARKERS))
    except OSError as error:
        raise RunError(f"--output {output}: {error}") from None
    console.print(f"written: {output}")
    return cells


def _cell(cells: list[Cell], attack: str, rule: str, dp: bool) -> Cell | None:
    found = [c for c in cells if (c.attack, c.rule, c.dp) == (attack, rule, dp)]
    return found[0] if found else None


def _accuracy(cells: list[Cell], attack: str, rule: str, dp: bool) -> float | None:
    cell = _cell(cells, attack, rule, dp)
    return cell.accuracy if cell is not None else None


def _shown(cell: Cell | None) -> str:
    """A table cell: the accuracy, `no model` for a run that ended without one, `-` if not
    run."""
    if cell is None:
        return "-"
    return f"{cell.accuracy:.4f}" if cell.accuracy is not None else "no model"


def verdicts(cells: list[Cell]) -> list[str]:
    """Whether the bar held, per DP setting and bar attack, in plain sentences."""
    lines = []
    for dp in (False, True):
        clean = _accuracy(cells, CLEAN, "fedavg", dp)
        if clean is None:
            continue
        for attack in BAR_ATTACKS:
            scored = {
                rule: accuracy
                for rule in RULES
                if (accuracy := _accuracy(cells, attack, rule, dp)) is not None
            }
            if not scored:
                continue
            best = max(scored, key=lambda rule: scored[rule])
            fedavg = scored.get("fedavg")
            best_gap = 100 * (clean - scored[best])
            fedavg_gap = None if fedavg is None else 100 * (clean - fedavg)
            held = best_gap <= BAR_POINTS and fedavg_gap is not None and fedavg_gap > BAR_POINTS
            lines.append(
                f"DP {'on' if dp else 'off'}, {attack}: clean {clean:.4f}; best rule {best} "
                f"{scored[best]:.4f} ({best_gap:+.1f} points below clean); fedavg "
                + (f"{fedavg:.4f} ({fedavg_gap:+.1f} points)" if fedavg is not None else "-")
                + f". Bar (best within {BAR_POINTS:g} points, fedavg not): "
                + ("met" if held else "NOT met")
            )
    return lines


def _print(console: Console, cells: list[Cell], *, dp: bool) -> None:
    chosen = [c for c in cells if c.dp == dp]
    if not chosen:
        return
    table = Table(title=f"Final test accuracy, DP {'on' if dp else 'off'}")
    table.add_column("attack")
    for rule in RULES:
        table.add_column(rule)
    for attack in ATTACKS:
        row = [_cell(chosen, attack, rule, dp) for rule in RULES]
        if all(cell is None for cell in row):
            continue
        table.add_row(attack, *(_shown(cell) for cell in row))
    console.print(table)


def robust_section(cells: list[Cell], rounds: int) -> str:
    """The Markdown section between MARKERS."""
    lines = [
        MARKERS[0],
        "## Robust aggregation under attack",
        "",
        f"Generated by `confide-simulate bench --robust --rounds {rounds}` on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC ({platform.machine()}, CPU only). Do not "
        "edit by hand: rerun it.",
        "",
        f"Workload: scenario `{BASE}` with {INSTITUTIONS} institutions, {rounds} rounds, no "
        f"federated evaluation, seed 0; {int(FRACTION * 100)}% of the institutions "
        f"({round(FRACTION * INSTITUTIONS)}) attack from round 1 (`[attack] fraction = "
        f"{FRACTION}`). Sign-flip sends w_t - 10Δ, scaling w_t + 10Δ (Δ: the honest change), "
        "noise adds N(0, 1) to every weight, label-flip trains on flipped labels, nan sends "
        "NaN (refused by the coordinator's update check). Rules: trimmed-mean β = "
        f"{TRIM_FRACTION}, krum and multi-krum f = {BYZANTINE['krum']}, bulyan f = "
        f"{BYZANTINE['bulyan']} (n >= 4f + 3 allows no more), federation.min_train = each "
        "rule's minimum; nan updates are refused by the coordinator, which leaves 14, too "
        "few for krum, multi-krum and bulyan with these parameters: those rounds are not "
        "aggregated (see `simulations/robust_bench.py`). DP on: DP-SGD at every institution, "
        "target epsilon 8 at delta 1e-5 (the scenario's), attackers included.",
        "",
    ]
    for dp in (False, True):
        chosen = [c for c in cells if c.dp == dp]
        if not chosen:
            continue
        lines += [
            f"### Final test accuracy, DP {'on' if dp else 'off'}",
            "",
            "| attack | " + " | ".join(RULES) + " |",
            "|---|" + "---|" * len(RULES),
        ]
        for attack in ATTACKS:
            row = [_cell(chosen, attack, rule, dp) for rule in RULES]
            if all(cell is None for cell in row):
                continue
            lines.append(f"| {attack} | " + " | ".join(_shown(cell) for cell in row) + " |")
        lines.append("")
    lines += [
        "### Round time (median over rounds 2.., all attacks), seconds",
        "",
        "| rule | DP off | DP on |",
        "|---|---|---|",
    ]
    for rule in RULES:
        times = []
        for dp in (False, True):
            rounds_of = [
                c.median_round
                for c in cells
                if c.rule == rule and c.dp == dp and c.median_round is not None
            ]
            times.append(f"{statistics.median(rounds_of):.3f}" if rounds_of else "-")
        lines.append(f"| {rule} | {times[0]} | {times[1]} |")
    failed = [c for c in cells if c.failed is not None]
    if failed:
        lines += ["", "*no model*: the simulation ended without a global model:", ""]
        lines += [
            f"- {c.attack} / {c.rule} / DP {'on' if c.dp else 'off'}: {c.failed}" for c in failed
        ]
    lines += ["", "### The bar", ""]
    lines += [f"- {line}" for line in verdicts(cells)]
    lines += ["", MARKERS[1]]
    return "\n".join(lines)
