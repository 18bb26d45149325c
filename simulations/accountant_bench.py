"""`confide-simulate bench --accountants`: what a tighter accountant buys at the same epsilon.

The same scenario is run with each sample-level accountant calibrating sigma for the job's
target epsilon: a tighter accountant (PLD) certifies the same (epsilon, delta) with less noise,
which shows as accuracy. Each run's mechanism is also re-accounted with the other accountants,
so the table says what the same noise would be certified at. Several seeds per cell, because a
single run's accuracy moves by a point or two with the seed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from confide.common.files import write_atomic
from confide.privacy.accounting import epsilon
from confide.privacy.mechanism import plan_round
from confide.simulations.deployment_bench import replace_section
from confide.simulations.engine import SimulationError, run_scenario
from confide.simulations.runner import RunError
from confide.simulations.scenario import ScenarioError, load_scenario

MARKERS = ("<!-- accountant-bench:start -->", "<!-- accountant-bench:end -->")
ACCOUNTANTS = ("rdp", "pld")


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One scenario under one accountant, over `seeds`."""

    scenario: str
    accountant: str
    target: float
    delta: float
    sigma: float  # institution 0's sigma at seed 0, calibrated by this accountant
    epsilon: dict[str, float]  # that mechanism's epsilon under every accountant
    accuracies: list[float]

    @property
    def accuracy(self) -> float:
        return statistics.mean(self.accuracies)


def measure(name: str, accountant: str, *, seeds: int, console: Console) -> Cell:
    """Run scenario `name` with `accountant` for each seed 0..seeds-1."""
    accuracies: list[float] = []
    sigma, history, target, delta = 0.0, [], 0.0, 0.0
    for seed in range(seeds):
        try:
            scenario = load_scenario(name, {"privacy": {"accountant": accountant}, "seed": seed})
        except ScenarioError as error:
            raise RunError(str(error)) from None
        if scenario.privacy.target_epsilon is None:
            raise RunError(f"{name}: the accountant benchmark needs a target_epsilon")
        target, delta = scenario.privacy.target_epsilon, scenario.privacy.delta
        console.print(f"benchmark: {name}, {accountant.upper()}, seed {seed} ...")
        try:
            outcome = run_scenario(scenario)
        except SimulationError as error:
            raise RunError(f"{name} ({accountant}): {error}") from None
        accuracies.append(outcome.history.rounds[-1].accuracy)
        if seed == 0:  # the bundled scenario's own seed (others partition non-IID data anew)
            mechanism = plan_round(
                scenario.privacy,
                scenario.train,
                declared_examples=scenario.declared_sizes(outcome.split)[0],
                planned_rounds=scenario.federation.rounds,
            )
            sigma = mechanism.noise_multiplier
            history = [mechanism.history_entry] * scenario.federation.rounds
    return Cell(
        scenario=name,
        accountant=accountant,
        target=target,
        delta=delta,
        sigma=sigma,
        epsilon={other: epsilon(history, delta, other) for other in ACCOUNTANTS},
        accuracies=accuracies,
    )


def noise_seconds(parameters: int = 1000) -> dict[str, float]:
    """Best of 5 seconds to noise one step's gradient of a `parameters` x `parameters` linear
    layer (about 1M values) with each DP-SGD noise source, one thread."""
    import time

    import torch
    from opacus.optimizers import DPOptimizer

    from confide.privacy.noise import CsprngDPOptimizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = torch.nn.Linear(parameters, parameters)
    optimizers = {
        "csprng": CsprngDPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=64,
        ),
        "torch": DPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=64,
            generator=torch.Generator(),
        ),
    }
    seconds = {}
    for name, optimizer in optimizers.items():
        best = float("inf")
        for _ in range(5):
            for parameter in model.parameters():
                # What Opacus's per-sample clipping leaves for add_noise (not a torch attribute).
                setattr(parameter, "summed_grad", torch.zeros_like(parameter))  # noqa: B010
            started = time.perf_counter()
            optimizer.add_noise()
            best = min(best, time.perf_counter() - started)
        seconds[name] = best
    torch.set_num_threads(threads)
    return seconds


def section(cells: list[Cell], seeds: int, noise: dict[str, float]) -> str:
    stamp = f"{datetime.now(UTC):%Y-%m-%d %H:%M}"
    lines = [
        MARKERS[0],
        "## Accountants: accuracy at the same epsilon",
        "",
        f"Generated by `confide-simulate bench --accountants` on {stamp} UTC ({seeds} seeds "
        f"per row, seeds 0..{seeds - 1}). Each row calibrates sigma "
        "for the scenario's target epsilon with its accountant; the epsilon columns re-account "
        "that same mechanism with each accountant. sigma and epsilon are institution 0's at seed 0 "
        "(the bundled scenario's seed; a Dirichlet partition changes with the seed, and with it "
        "the institutions' declared sizes), for every planned round.",
        "",
        "| scenario | accountant | target epsilon | sigma | epsilon (RDP) | epsilon (PLD) "
        "| test accuracy (mean) | per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        lines.append(
            f"| {cell.scenario} | {cell.accountant.upper()} | {cell.target:g} | "
            f"{cell.sigma:.4f} | {cell.epsilon['rdp']:.3f} | {cell.epsilon['pld']:.3f} | "
            f"{cell.accuracy:.4f} | {', '.join(f'{a:.4f}' for a in cell.accuracies)} |"
        )
    lines += [
        "",
        "epsilon at delta from the scenario (1e-5), add/remove-one relation, every step of "
        "every round; both accountants are upper bounds (PLD: dp-accounting's pessimistic "
        "discretisation), so the smaller one is the tighter statement of the same mechanism.",
        "",
        "Cost of the DP-SGD noise source (one step, 1,001,000 parameters, one thread, best of "
        f'5): OS CSPRNG (`noise_generator = "csprng"`, the deployed default) '
        f"{1000 * noise['csprng']:.0f} ms, PyTorch's generator (`\"torch\"`, the simulation's) "
        f"{1000 * noise['torch']:.0f} ms ({noise['csprng'] / noise['torch']:.0f}x). For the "
        "bundled MLPs (under 5,000 parameters) either is well under a millisecond per step.",
        MARKERS[1],
    ]
    return "\n".join(lines)


def run_accountant_benchmark(
    scenarios: list[str], output: Path, *, seeds: int, console: Console
) -> list[Cell]:
    """Every scenario under every accountant; the section of `output` is rewritten after each
    row, so that a run cut short keeps what it measured."""
    noise = noise_seconds()
    cells: list[Cell] = []
    for name in scenarios:
        for accountant in ACCOUNTANTS:
            cells.append(measure(name, accountant, seeds=seeds, console=console))
            previous = output.read_text() if output.is_file() else "# Benchmarks\n"
            try:
                write_atomic(
                    output, replace_section(previous, section(cells, seeds, noise), MARKERS)
                )
            except OSError as error:
                raise RunError(f"--output {output}: {error}") from None
    console.print(f"written: {output}")
    return cells
