"""`confide-simulate bench`: DP on vs DP off vs plain Flower on one workload, in one run.

Round time is the median over rounds 2..R (round 1 pays Ray's start-up and is reported
separately). Ratios are taken within this one run on this one machine, so they compare the
software, not the hardware.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from confide.common.files import write_atomic
from confide.server.results import median_after_first
from confide.simulations.accountant_bench import MARKERS as ACCOUNTANT_MARKERS
from confide.simulations.baseline import plain_apps
from confide.simulations.deployment_bench import END, START, kept_section, replace_section
from confide.simulations.engine import SimulationError, run_scenario, simulate
from confide.simulations.robust_bench import MARKERS as ROBUST_MARKERS
from confide.simulations.runner import RunError
from confide.simulations.scenario import ScenarioConfig, ScenarioError, load_scenario

DEPLOYED_MARKERS = (START, END)
SCALE_SCENARIO = "synthetic-10000"
# Issue 15: confide's round time at most half of plain Flower's at 10,000 institutions.
SCALE_TARGET = 0.5


@dataclass(kw_only=True)
class Measurement:
    name: str
    first_round: float
    median_round: float
    accuracy: float
    epsilon_max: float | None
    peak_rss_mb: float
    rounds: int
    institutions: int

    @property
    def per_round(self) -> str:
        return f"{self.median_round:.3f}"


def measure_confide(name: str, scenario: ScenarioConfig) -> Measurement:
    outcome = run_scenario(scenario)
    seconds = [r.seconds for r in outcome.history.rounds]
    return Measurement(
        name=name,
        first_round=seconds[0],
        median_round=median_after_first(seconds),
        accuracy=outcome.history.rounds[-1].accuracy,
        epsilon_max=outcome.history.epsilon_max if scenario.privacy.enabled else None,
        peak_rss_mb=outcome.peak_rss_bytes / 2**20,
        rounds=len(seconds),
        institutions=scenario.simulation.institutions,
    )


def measure_plain(name: str, scenario: ScenarioConfig) -> Measurement:
    seconds: list[float] = []
    accuracy: list[float] = []
    server, client = plain_apps(scenario, seconds, accuracy)
    _, peak = simulate(server, client, scenario)
    if len(seconds) != scenario.federation.rounds:
        raise RunError(f"plain Flower run stopped after {len(seconds)} rounds")
    return Measurement(
        name=name,
        first_round=seconds[0],
        median_round=median_after_first(seconds),
        accuracy=accuracy[-1],
        epsilon_max=None,
        peak_rss_mb=peak / 2**20,
        rounds=len(seconds),
        institutions=scenario.simulation.institutions,
    )


def local_training_ms(scenario: ScenarioConfig, repeats: int = 30) -> float:
    """Median milliseconds of one institution's local round (`train_round`), one thread."""
    import time

    from confide.privacy.mechanism import plan_round
    from confide.privacy.trainer import train_round
    from confide.tasks.registry import get_task

    torch.set_num_threads(1)
    split = scenario.data_source().split()
    local = split.institutions[0].train
    task = get_task(scenario.task.name)
    mechanism = plan_round(
        scenario.privacy,
        scenario.train,
        declared_examples=scenario.declared_sizes(split)[0],
        planned_rounds=scenario.federation.rounds,
    )
    timings = []
    for repeat in range(repeats + 1):
        model = task.build_model(
            scenario.task, shape=split.shape, classes=split.classes, seed=scenario.seed
        )
        started = time.perf_counter()
        train_round(
            model,
            local,
            train=scenario.train,
            privacy=scenario.privacy,
            mechanism=mechanism,
            history=[],
            seed=repeat,
        )
        if repeat:  # the first one pays one-off costs (imports)
            timings.append(time.perf_counter() - started)
    return 1000 * statistics.median(timings)


def _forget_previous_run() -> None:
    """Drop what an earlier run left in this driver that the next would count as its own
    memory: the cached federated splits, and garbage."""
    import gc

    from confide.client.data import clear_split_cache

    clear_split_cache()
    gc.collect()


def run_benchmarks(
    scenario_name: str, rounds: int, output: Path, *, scale: bool, console: Console
) -> list[Measurement]:
    try:
        dp_on = load_scenario(scenario_name, {"federation": {"rounds": rounds}})
        dp_off = load_scenario(
            scenario_name,
            {"federation": {"rounds": rounds}, "privacy": {"enabled": False}},
        )
        big = scale_workloads() if scale else None
    except ScenarioError as error:
        raise RunError(str(error)) from None
    if not dp_on.privacy.enabled:
        raise RunError(f"{scenario_name}: the benchmark workload must have privacy enabled")
    runs = [
        ("confide, DP off", lambda: measure_confide("confide, DP off", dp_off)),
        ("confide, DP on", lambda: measure_confide("confide, DP on", dp_on)),
        ("plain Flower", lambda: measure_plain("plain Flower", dp_off)),
    ]
    if big is not None:
        big_on, big_off = big
        runs += [
            ("synthetic-10000, confide DP on", lambda: measure_confide("confide, DP on", big_on)),
            (
                "synthetic-10000, confide DP off",
                lambda: measure_confide("confide, DP off", big_off),
            ),
            ("synthetic-10000, plain Flower", lambda: measure_plain("plain Flower", big_off)),
        ]
    results = []
    loads = []  # the 1-minute load average before each run and after the last
    for label, measure in runs:
        console.print(f"benchmark: {label} ...")
        _forget_previous_run()
        loads.append(os.getloadavg()[0])
        try:
            results.append(measure())
        except SimulationError as error:
            raise RunError(f"{label}: {error}") from None
    loads.append(os.getloadavg()[0])
    local = {"DP off": local_training_ms(dp_off), "DP on": local_training_ms(dp_on)}
    off, on, plain = results[0], results[1], results[2]
    at_scale = results[3:]
    ratios = {
        "DP on / DP off (round time)": on.median_round / off.median_round,
        "confide DP off / plain Flower (round time)": off.median_round / plain.median_round,
        "DP on / DP off (accuracy)": on.accuracy / off.accuracy,
        "confide DP off / plain Flower (accuracy)": off.accuracy / plain.accuracy,
        "DP on / DP off (local training time of one institution)": local["DP on"] / local["DP off"],
    }
    _print(console, f"Benchmark: {dp_on.name}, {rounds} rounds", results[:3], ratios)
    document = _markdown(dp_on, rounds, results[:3], ratios, local, scale=big is not None)
    if big is not None:
        _print(console, f"Benchmark: {SCALE_SCENARIO}", at_scale, {})
        console.print(scale_verdict(at_scale))
        section = scale_section(big[0], at_scale, load=max(loads[3:]))
        document = document.rstrip("\n") + "\n\n" + section
    previous = output.read_text() if output.is_file() else ""
    # Sections other commands write.
    for markers in (DEPLOYED_MARKERS, ACCOUNTANT_MARKERS, ROBUST_MARKERS):
        if (kept := kept_section(previous, markers)) is not None:
            document = replace_section(document, kept, markers)
    try:
        write_atomic(output, document)
    except OSError as error:
        raise RunError(f"--output {output}: {error}") from None
    console.print(f"written: {output}")
    return results


def _print(
    console: Console, title: str, results: list[Measurement], ratios: dict[str, float]
) -> None:
    table = Table(title=title)
    for column in (
        "variant",
        "s/round (median r2..)",
        "round 1 s",
        "accuracy",
        "epsilon",
        "peak RSS MB",
    ):
        table.add_column(column)
    for m in results:
        table.add_row(
            m.name,
            m.per_round,
            f"{m.first_round:.1f}",
            f"{m.accuracy:.4f}",
            f"{m.epsilon_max:.3f}" if m.epsilon_max is not None else "-",
            f"{m.peak_rss_mb:.0f}",
        )
    console.print(table)
    for label, value in ratios.items():
        console.print(f"{label}: {value:.3f}")


def _markdown(
    scenario: ScenarioConfig,
    rounds: int,
    results: list[Measurement],
    ratios: dict[str, float],
    local: dict[str, float],
    *,
    scale: bool = False,
) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `confide-simulate bench"
        + (" --scale" if scale else "")
        + f"` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Do not edit by hand: rerun it.",
        "",
        f"Machine: {platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, CPU only.",
        "",
        f"Workload: scenario `{scenario.name}` ({scenario.simulation.institutions} institutions, "
        f"task `{scenario.task.name}`, model hidden {scenario.task.model.hidden}, batch "
        f"{scenario.train.batch_size}, {scenario.train.local_epochs} local epoch(s)), "
        f"{rounds} rounds per variant, seed {scenario.seed}. All variants run in one process, "
        "one after the other, each on a fresh Ray instance (1 CPU per simulated institution).",
        "",
        "- *s/round* is the median over rounds 2..R; round 1 includes Ray's start-up and "
        "each Ray worker's first message (imports, data), and is listed separately.",
        "- *plain Flower* is Flower's stock `FedAvg` with a textbook PyTorch ClientApp "
        "(DataLoader + SGD) on the same data, model and hyperparameters, with the same central "
        "evaluation; confide adds the roster, update validation, privacy bookkeeping and "
        "reproducible sampling.",
        "",
        "| variant | institutions | rounds | s/round | round 1 s | test accuracy | max epsilon "
        "| peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        eps = f"{m.epsilon_max:.3f}" if m.epsilon_max is not None else "-"
        lines.append(
            f"| {m.name} | {m.institutions} | {m.rounds} | {m.median_round:.3f} | "
            f"{m.first_round:.1f} | {m.accuracy:.4f} | {eps} | {m.peak_rss_mb:.0f} |"
        )
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {label} | {value:.3f} |" for label, value in ratios.items()]
    lines += [
        "",
        "Local training of one institution for one round (`train_round`, median of 30, one "
        f"thread): DP off {local['DP off']:.1f} ms, DP on {local['DP on']:.1f} ms.",
        "",
        "Reading the numbers:",
        "",
        "- A simulated round with few institutions is dominated by message polling, not by "
        "training (local DP-SGD costs milliseconds per institution): stock Flower's "
        "in-memory grid and simulation engine each poll every 0.1 s, so plain Flower's round "
        "times move in steps of about 0.1 s; confide's simulations poll every 20 ms "
        "(`confide.simulations.dispatch`, see the scale section), which is most of the "
        "difference between confide and plain Flower here.",
        f"- The DP-off variants keep the DP workload's hyperparameters (lr {scenario.train.lr}, "
        f"batch {scenario.train.batch_size}). That learning rate suits DP-SGD, whose clipping "
        "bounds every step; without clipping it makes plain SGD oscillate from round to round, "
        "so the DP-off accuracies (and their ratios) vary by several points with the seed. "
        "The tuned non-private baseline is the `digits-nodp` scenario.",
        "",
        "Peak RSS is the resident memory of the driver process plus all its descendants "
        "(Ray's GCS, raylet and workers), sampled every 0.25 s.",
        "",
    ]
    return "\n".join(lines)


def scale_workloads() -> tuple[ScenarioConfig, ScenarioConfig]:
    """`synthetic-10000` as bundled (DP on), and the same without DP (what plain Flower
    runs: same data, partitions, model, hyperparameters and per-round sample size)."""
    dp_on = load_scenario(SCALE_SCENARIO)
    dp_off = load_scenario(SCALE_SCENARIO, {"privacy": {"enabled": False}})
    return dp_on, dp_off


def scale_ratio(results: list[Measurement]) -> float:
    """confide (DP on) / plain Flower, median round time, at scale (the issue's measure)."""
    confide, plain = _named(results, "confide, DP on"), _named(results, "plain Flower")
    return confide.median_round / plain.median_round


def scale_verdict(results: list[Measurement]) -> str:
    """One line: the ratio against SCALE_TARGET and whether it was met."""
    ratio = scale_ratio(results)
    met = "met" if ratio <= SCALE_TARGET else "MISSED"
    institutions = results[0].institutions
    return (
        f"Target: confide's round time at most {SCALE_TARGET:g}x plain Flower's at "
        f"{institutions:,} institutions; measured {ratio:.2f}x: {met}."
    )


def _named(results: list[Measurement], name: str) -> Measurement:
    return next(m for m in results if m.name == name)


def scale_section(
    scenario: ScenarioConfig, results: list[Measurement], *, load: float | None = None
) -> str:
    """The Markdown section of the `--scale` runs: each variant, the ratios to plain
    Flower and the verdict against SCALE_TARGET; `load`: the highest 1-minute load average
    seen between them (other work on the machine slows every row, not always equally)."""
    plain = _named(results, "plain Flower")
    federation = scenario.federation
    institutions = scenario.simulation.institutions
    sampled = max(federation.min_train, int(institutions * federation.fraction_train))
    lines = [
        f"## Scale: {institutions:,} institutions",
        "",
        f"Scenario `{scenario.name}`: {institutions:,} virtual institutions, {sampled} sampled "
        f"per round (fraction {federation.fraction_train:g}), task `{scenario.task.name}` "
        f"({scenario.task.samples:,} examples, about "
        f"{scenario.task.samples // institutions} per institution before the test and "
        f"validation splits), model hidden {scenario.task.model.hidden}, batch "
        f"{scenario.train.batch_size}, seed {scenario.seed}, {federation.rounds} rounds per "
        "variant, all in this one run.",
        "",
        "| variant | DP | s/round (median r2..) | round 1 s | test accuracy | max epsilon | "
        "peak RSS MB | round time / plain Flower's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        eps = f"{m.epsilon_max:.3f}" if m.epsilon_max is not None else "-"
        dp = "on" if m.epsilon_max is not None else "off"
        lines.append(
            f"| {m.name} | {dp} | {m.median_round:.3f} | {m.first_round:.1f} | "
            f"{m.accuracy:.4f} | {eps} | {m.peak_rss_mb:.0f} | "
            f"{m.median_round / plain.median_round:.2f} |"
        )
    lines += [
        "",
        scale_verdict(results),
        "",
        "- *plain Flower* is stock Flower 1.41 (`FedAvg`, a textbook PyTorch ClientApp, "
        "Flower's own simulation engine) on the same data, partitions, model, "
        "hyperparameters and number of institutions sampled per round, without DP (stock "
        "Flower has no per-example DP-SGD); *confide, DP off* is the like-for-like row "
        "without DP, *confide, DP on* the scenario as bundled, the one the target is for.",
        "- Flower's engine hands out messages from one loop that, every 0.1 s, scans every "
        "stored message once per registered node (nodes x messages checks): that is why "
        "plain Flower's round time grows with the node count. confide's simulations "
        "dispatch in one pass over the messages every 20 ms and collect replies every 20 ms "
        "(`confide.simulations.dispatch`, used with Flower 1.41 only), and name their "
        "virtual institutions from the engine's node -> partition mapping instead of a query "
        "message to every node, which was most of round 1. Neither changes what any "
        "institution computes: a seed gives the same model and numbers.",
        "- Round 1 includes Ray's start-up and, in every Ray worker, building the "
        f"{institutions:,} partitions once (seconds); a DP-on round also computes each "
        "institution's noise multiplier (cached per worker for the same public values).",
        "- Peak RSS is the driver and all its Ray processes together, as above. The rows run "
        "one after the other in one driver, in the order listed; before each, the driver's "
        "cached partitions are dropped and its garbage collected, but memory Python keeps "
        "after a run is counted again in the next row, so read these as upper bounds, not "
        "differences between the variants.",
    ]
    if load is not None:
        lines.append(
            f"- Load: the 1-minute load average reached {load:.1f} on {_cpus()} CPUs during "
            "these runs. Above the CPU count, other work shared the machine and slowed the "
            "rows, not necessarily equally: rerun on a quiet machine before reading small "
            "differences."
        )
    return "\n".join([*lines, ""])


def _cpus() -> int:
    return os.cpu_count() or 1


def run_deployed_benchmark(rounds: int, output: Path, *, console: Console) -> None:
    """Time deployed jobs on this host and update their section of OUTPUT."""
    from confide.simulations.deployment_bench import (
        MANY_INSTITUTIONS,
        MANY_ROUNDS,
        DeploymentBenchError,
        clientapp_import_seconds,
        deployed_section,
        measure_deployed,
        measure_many,
    )

    console.print(f"benchmark: coordinator + 2 institutions on 127.0.0.1, {rounds} rounds ...")
    try:
        measured = measure_deployed(rounds)
        for m in measured:
            console.print(
                f"deployed, {m.variant}: {m.median_round:.1f} s/round (median of rounds 2..), "
                f"round 1 {m.seconds[0]:.1f} s, accuracy {m.accuracy:.4f}"
            )
        console.print(
            f"benchmark: coordinator + {MANY_INSTITUTIONS} institutions on 127.0.0.1, "
            f"{MANY_ROUNDS} rounds ..."
        )
        many = measure_many()
    except (DeploymentBenchError, OSError, subprocess.TimeoutExpired) as error:
        raise RunError(f"deployed benchmark: {error}") from None
    console.print(
        f"{MANY_INSTITUTIONS} institutions: {many.job.median_round:.1f} s/round, "
        f"{max(many.idle_mib):.0f} MiB per institution at most, rounds recorded twice: "
        f"{many.twice}"
    )
    section = deployed_section(measured, clientapp_import_seconds(), many)
    previous = output.read_text() if output.is_file() else "# Benchmarks\n"
    try:
        write_atomic(output, replace_section(previous, section))
    except OSError as error:
        raise RunError(f"--output {output}: {error}") from None
    console.print(f"written: {output}")
