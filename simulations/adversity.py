"""A scenario's `[attack]` and `[faults]` wired into a simulation, and what they cost.

The engine asks `Adversity` for the ClientApp the virtual institutions run (the honest
confide ClientApp, wrapped: confide.client.app knows nothing of attacks) and for the grid
wrapper its ServerApp sends through (confide.server.app only applies it). The runner asks
for results.json's `attack` and `faults` records, and prices them with a clean twin: the
same scenario (same seed, data, starting ledgers) without `[attack]` and `[faults]`, whose
final accuracy minus the attacked run's is the accuracy cost.

What each attack and fault does: confide.simulations.attack and confide.simulations.faults.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from confide.client.app import build_client_app
from confide.client.data import Resolver
from confide.common.files import write_atomic
from confide.privacy.instructions import RoundInstructions
from confide.server.results import RESULTS, FaultEvent, FaultKind, Results, document_json
from confide.simulations.attack import AttackPlan, FlippedLabels, attack_record
from confide.simulations.faults import (
    SERVER_ROUND,
    FaultPlan,
    FaultyGrid,
    crash_reply,
    faults_record,
)
from confide.simulations.scenario import ScenarioConfig

if TYPE_CHECKING:
    from rich.console import Console

Handler = Callable[[Message, Context], Message]
PLURALS: dict[FaultKind, str] = {
    "dropout": "dropouts",
    "straggler": "stragglers",
    "crash": "crashes",
}


def adverse(scenario: ScenarioConfig) -> bool:
    """Whether the scenario has an `[attack]` or `[faults]` table."""
    return scenario.attack is not None or scenario.faults is not None


def clean_twin(scenario: ScenarioConfig) -> ScenarioConfig:
    """The scenario without `[attack]` and `[faults]`, everything else the same."""
    return scenario.model_copy(update={"attack": None, "faults": None})


class Adversity:
    """The attack and faults of one run of `scenario` (none: the honest app, no wrapper)."""

    def __init__(self, scenario: ScenarioConfig) -> None:
        count, seed = scenario.simulation.institutions, scenario.seed
        attack, faults = scenario.attack, scenario.faults
        self.attack = (
            None if attack is None else AttackPlan.of(attack, institutions=count, seed=seed)
        )
        self.faults = None if faults is None else FaultPlan.of(faults, seed=seed)
        self.grid: FaultyGrid | None = None

    def client_app(self, source: Resolver, *, noise_seed: int) -> ClientApp:
        """The virtual institutions' ClientApp (see `simulation_client_app`)."""
        return simulation_client_app(
            source, noise_seed=noise_seed, attack=self.attack, faults=self.faults
        )

    def grid_wrapper(self) -> Callable[[Grid], Grid] | None:
        """What the ServerApp's grid is wrapped in (None without faults)."""
        plan = self.faults
        if plan is None:
            return None

        def wrap(grid: Grid) -> Grid:
            self.grid = FaultyGrid(grid, plan)
            return self.grid

        return wrap

    @property
    def events(self) -> list[FaultEvent]:
        """The faults the run met (after it ran)."""
        return list(self.grid.events) if self.grid is not None else []


def simulation_client_app(
    source: Resolver,
    *,
    noise_seed: int,
    attack: AttackPlan | None = None,
    faults: FaultPlan | None = None,
) -> ClientApp:
    """confide's ClientApp for the virtual institutions of `source`, whose train handler
    first applies `faults` (a crash) and then `attack` (an attacker's round). Queries and
    evaluations are the honest app's. Without either: the honest app itself."""
    honest = build_client_app(source, noise_seed=noise_seed)
    if attack is None and faults is None:
        return honest
    flipped = None
    if attack is not None and attack.kind == "label-flip":
        flipped = build_client_app(FlippedLabels(source), noise_seed=noise_seed)
    app = ClientApp()
    app.query()(_forward(honest))
    app.evaluate()(_forward(honest))
    app.train()(_train(honest, flipped, source, attack, faults))
    return app


def _forward(app: ClientApp) -> Handler:
    def handle(message: Message, context: Context) -> Message:
        return app(message, context)

    return handle


def _train(
    honest: ClientApp,
    flipped: ClientApp | None,
    source: Resolver,
    attack: AttackPlan | None,
    faults: FaultPlan | None,
) -> Handler:
    def train(message: Message, context: Context) -> Message:
        config = message.content.config_records["config"]
        server_round = int(cast(int, config[SERVER_ROUND]))
        me = source(context)
        fault = faults.fault(server_round=server_round, institution=me.name) if faults else None
        if fault == "crash":  # mid-round: its data is loaded, nothing trained or recorded yet
            me.load(RoundInstructions.from_config(dict(config)))
            return crash_reply(message, institution=me.name, server_round=server_round)
        if attack is None or not attack.attacks(server_round=server_round, institution=me.name):
            return honest(message, context)
        if flipped is not None:  # label-flip: honest training on poisoned data
            return flipped(message, context)
        reply = honest(message, context)  # trains and records the spend, like any round
        if reply.has_error():
            return reply
        reply.content["arrays"] = attack.poison(
            current=message.content.array_records["arrays"],
            trained=reply.content.array_records["arrays"],
            server_round=server_round,
            institution=me.name,
        )
        return reply

    return train


def records(scenario: ScenarioConfig, events: list[FaultEvent]) -> dict[str, Any]:
    """results.json's `attack` and `faults` of a run of `scenario` that met `events` (only
    those the scenario has), without the clean twin's numbers."""
    found: dict[str, Any] = {}
    if scenario.attack is not None:
        found["attack"] = attack_record(
            scenario.attack, institutions=scenario.simulation.institutions, seed=scenario.seed
        )
    if scenario.faults is not None:
        found["faults"] = faults_record(scenario.faults, events)
    return found


def priced(results: Results, clean_accuracy: float) -> Results:
    """`results` with the clean twin's final accuracy and the cost (clean minus this run's
    final accuracy) in its `attack` and `faults` records."""
    cost = clean_accuracy - results.final.accuracy
    numbers = {"clean_accuracy": clean_accuracy, "accuracy_cost": cost}
    update = {
        field: record.model_copy(update=numbers)
        for field in ("attack", "faults")
        if (record := getattr(results, field)) is not None
    }
    return results.model_copy(update=update)


def snapshot(ledgers: Path) -> Path | None:
    """A copy of the ledgers a run starts from, for its clean twin to start from the same
    state (None when there are none yet: the twin starts from empty ledgers too). Removed
    by `clean_accuracy`, or when the process exits."""
    if not ledgers.is_dir():
        return None
    copy = Path(tempfile.mkdtemp(prefix="confide-twin-ledgers-")) / "state"
    atexit.register(shutil.rmtree, copy.parent, True)
    shutil.copytree(ledgers, copy)
    return copy


def clean_accuracy(scenario: ScenarioConfig, *, start: Path | None) -> float:
    """The final test accuracy of the clean twin of `scenario`, its ledgers a throwaway copy
    of `start` (a `snapshot`, removed here); SimulationError if it fails."""
    from confide.simulations.engine import run_scenario  # the engine imports this module

    with tempfile.TemporaryDirectory(prefix="confide-twin-") as scratch:
        state = Path(scratch) / "state"
        if start is not None:
            shutil.move(start, state)
            shutil.rmtree(start.parent, ignore_errors=True)
        outcome = run_scenario(clean_twin(scenario), state=state)
    return outcome.history.rounds[-1].accuracy


def describe(results: Results) -> str | None:
    """The summary's line on the attack and faults and what they cost, None without."""
    attack, faults = results.attack, results.faults
    if attack is None and faults is None:
        return None
    parts = []
    if attack is not None:
        total = len(results.institutions)
        parts.append(f"under {attack.kind} by {len(attack.institutions)} of {total} institutions")
    if faults is not None:
        kinds = [event.kind for event in faults.events]
        counted = ", ".join(
            f"{kinds.count(kind)} {kind if kinds.count(kind) == 1 else plural}"
            for kind, plural in PLURALS.items()
        )
        parts.append(f"with faults ({counted})")
    line = f"accuracy {results.final.accuracy:.3f} " + " ".join(parts)
    record = attack or faults
    assert record is not None
    if record.clean_accuracy is None or record.accuracy_cost is None:
        return line + "; no clean twin run (--no-baseline, or a resumed run)"
    return (
        f"{line}; clean {record.clean_accuracy:.3f}: cost {100 * record.accuracy_cost:.1f} points"
    )


def price_run(
    scenario: ScenarioConfig,
    results: Results,
    directory: Path,
    *,
    start: Path | None,
    console: Console,
) -> Results:
    """Run the clean twin, write the priced results into `directory`'s results.json and
    return them; a twin that fails costs only the price (a warning), never the run's results
    (written before the twin starts)."""
    from confide.common.errors import ConfideError

    console.print(
        "clean twin: the same scenario without [attack] and [faults], for the accuracy cost "
        "(--no-baseline skips it)",
        highlight=False,
        markup=False,
    )
    try:
        accuracy = clean_accuracy(scenario, start=start)
    except (ConfideError, OSError) as error:
        console.print(f"[bold yellow]warning:[/] the clean twin failed: {error}", highlight=False)
        return results
    results = priced(results, accuracy)
    write_atomic(directory / RESULTS, document_json(results))
    return results
