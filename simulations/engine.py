"""Run a scenario on Flower's simulation engine (Ray).

This is the one module that calls `flwr.simulation.run_simulation` (deprecated upstream in
favour of `flwr run`), so moving to another entry point touches this file only.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from confide.client.data import SimulatedInstitutions
from confide.client.device import resolve_device
from confide.common.errors import ModelFileError, SimulationError
from confide.common.seeding import derive_seed
from confide.privacy.ledger import Ledger
from confide.privacy.mechanism import DeltaTooLarge, check_delta, planned_noise
from confide.privacy.trainer import PrivacyError, check_model
from confide.server.app import build_server_app, label_names
from confide.server.history import JobHistory, RoundObserver
from confide.server.model_file import (
    Ancestor,
    ModelCard,
    card_task,
    check_continues,
    lineage_of,
    read_card,
    read_weights,
)
from confide.server.results import FaultEvent
from confide.simulations.adversity import Adversity
from confide.simulations.dispatch import EngineRoster, prompt_engine
from confide.simulations.dispatch import supported as engine_supported
from confide.simulations.environment import apply_defaults
from confide.simulations.resources import MemorySampler
from confide.simulations.scenario import ScenarioConfig
from confide.tasks.registry import get_task
from confide.tasks.splits import FederatedSplit

if TYPE_CHECKING:
    import torch

    from confide.server.checkpoint import Checkpoint, Checkpointing


REPLY_SECONDS = 0.02  # how often the ServerApp collects replies in simulation


@dataclass
class SimulationOutcome:
    history: JobHistory
    split: FederatedSplit
    seconds: float
    peak_rss_bytes: int
    lineage: list[Ancestor] = field(default_factory=list)  # the models the run continued
    faults: list[FaultEvent] = field(default_factory=list)  # those met ([faults])


def starting_model(
    scenario: ScenarioConfig, source: SimulatedInstitutions, split: FederatedSplit
) -> tuple[dict[str, torch.Tensor] | None, list[Ancestor]]:
    """The weights of the model file `[model] init` names (with its card beside it), checked
    against the scenario's task, inputs and classes, and the lineage it brings; (None, [])
    without one. SimulationError, before Ray starts, if it cannot be continued here."""
    reference = scenario.model.init
    if reference is None:
        return None, []
    if scenario.model.registered_init() is not None:
        raise SimulationError(
            f"model.init = {reference!r} names a coordinator's registered version; a "
            "simulation starts from a model file (`confide-server models export` writes one)"
        )
    try:
        card = read_card(Path(reference))
        labels = label_names(split.test)
        check_continues(card, scenario, what=reference, shape=split.shape, labels=labels)
        if card.run.kind == "simulation" and card.task == card_task(scenario.task):
            _check_same_ledgers(card, source)
        return read_weights(Path(reference), card), lineage_of(card, reference)
    except ModelFileError as error:
        raise SimulationError(f"model.init: {error}") from None


def _check_same_ledgers(card: ModelCard, source: SimulatedInstitutions) -> None:
    """A simulated model continued on its own task: each virtual institution must hold the
    data it held and record in the ledger that recorded it (the same commitment: the same
    ledger key and data). Otherwise a record's earlier spend would sit in another ledger, or
    in none, and every epsilon of the run would start from too little."""
    for row in card.privacy.institutions:
        index = int(row.id)
        folder = source.state / f"institution-{index}" if source.state is not None else None
        ledger = Ledger(folder) if folder is not None else None
        same = (
            ledger is not None
            and index < source.institutions
            and ledger.exists()
            and row.data_commitment == ledger.commitment(source.fingerprint(index))
        )
        if not same:
            raise ModelFileError(
                f"virtual institution {index} does not continue the ledger that recorded the "
                "model's run on its data (another seed, data split or number of institutions, "
                "or other ledgers): its earlier spend would not count. Continue with the "
                "run's own ledgers (the default) and its seed, [data] and institutions"
            )


class _DropDeprecation(logging.Filter):
    """`run_simulation`'s deprecation notice is known (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


def backend_config(scenario: ScenarioConfig) -> dict[str, Any]:
    settings = scenario.simulation
    init_args: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
    }
    if settings.ray_address:
        init_args["address"] = settings.ray_address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    return {
        "client_resources": {
            "num_cpus": settings.cpus_per_institution,
            "num_gpus": gpus_per_institution(scenario),
        },
        "init_args": init_args,
    }


def gpus_per_institution(scenario: ScenarioConfig) -> float:
    """The GPU share Ray reserves for each running virtual institution.

    Ray shows an actor only the GPUs reserved for it: with none reserved, `device = "auto"`
    would quietly train on the CPU and `cuda` would fail in every actor. So unless the
    scenario sets `gpus_per_institution`, a CUDA device gets the host's GPUs divided among the
    institutions that can run at once (CPUs / cpus_per_institution), and a CPU device none.
    """
    settings = scenario.simulation
    if settings.gpus_per_institution is not None:
        return settings.gpus_per_institution
    if resolve_device(settings.device).type != "cuda":
        return 0.0
    import torch

    concurrent = max(1, int((os.cpu_count() or 1) / settings.cpus_per_institution))
    return min(1.0, torch.cuda.device_count() / concurrent)


def simulate(
    server_app: ServerApp,
    client_app: ClientApp,
    scenario: ScenarioConfig,
    *,
    verbose: bool = False,
    prompt: bool = False,
    roster: EngineRoster | None = None,
) -> tuple[float, int]:
    """Run the two apps on `scenario.simulation.institutions` virtual nodes.

    `prompt` runs Flower's engine with confide's message dispatch
    (confide.simulations.dispatch: one pass over the messages instead of one per node,
    every 20 ms), publishing the engine's node -> partition mapping to `roster`; without it
    the engine is Flower's own (what the plain Flower benchmark measures).

    Returns (wall seconds, peak resident memory of this process and its Ray workers).
    ValueError for a `roster` without `prompt`: only confide's dispatch fills it, and a
    ServerApp waiting for it would wait until its timeout.
    """
    if roster is not None and not prompt:
        raise ValueError("a roster is filled only by confide's dispatch: pass prompt=True")
    apply_defaults()
    from flwr.simulation import run_simulation

    flower_home = os.environ.get("FLWR_HOME")
    scratch = None
    if flower_home is None:  # keep Flower's files out of the user's home directory
        scratch = tempfile.mkdtemp(prefix="confide-flwr-")
        os.environ["FLWR_HOME"] = scratch
    flower_logger = logging.getLogger("flwr")
    level = flower_logger.level
    quiet = _DropDeprecation()
    flower_logger.addFilter(quiet)
    # Ray installs a root handler; without this every Flower line would print twice.
    propagate, flower_logger.propagate = flower_logger.propagate, False
    if not verbose:
        flower_logger.setLevel(logging.WARNING)
    started = time.perf_counter()
    try:
        with MemorySampler() as memory, _engine(prompt, roster):
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=scenario.simulation.institutions,
                backend_config=backend_config(scenario),
                verbose_logging=verbose,
            )
    finally:
        flower_logger.setLevel(level)
        flower_logger.removeFilter(quiet)
        flower_logger.propagate = propagate
        if scratch is not None:
            os.environ.pop("FLWR_HOME", None)
            shutil.rmtree(scratch, ignore_errors=True)
    return time.perf_counter() - started, memory.peak_bytes


def _engine(prompt: bool, roster: EngineRoster | None) -> AbstractContextManager[bool]:
    return prompt_engine(roster) if prompt else nullcontext(False)


def _prompt_grid(wrapper: Callable[[Grid], Grid] | None) -> Callable[[Grid], Grid]:
    """The ServerApp's grid: Flower's in-memory grid collecting replies every
    `REPLY_SECONDS` (its constructor's `pull_interval`, 0.1 s by default: a round waits for
    its last reply up to that long after it arrived), wrapped by `wrapper` (faults) if any."""

    def prompt(grid: Grid) -> Grid:
        if isinstance(grid, InMemoryGrid):
            grid.pull_interval = REPLY_SECONDS
        return wrapper(grid) if wrapper is not None else grid

    return prompt


def preflight(scenario: ScenarioConfig, split: FederatedSplit) -> None:
    """Refuse, before Ray starts, what every institution would otherwise fail on each round."""
    try:
        resolve_device(scenario.simulation.device)
    except (RuntimeError, ValueError) as error:
        raise SimulationError(f"simulation.device: {error}") from None
    privacy = scenario.privacy
    if not privacy.enabled:
        return
    model = get_task(scenario.task.name).build_model(
        scenario.task, shape=split.shape, classes=split.classes, seed=scenario.seed
    )
    try:
        check_model(model)
    except PrivacyError as error:
        raise SimulationError(f"task.model: {error}") from None
    rounds = scenario.federation.rounds
    for index, declared in enumerate(scenario.declared_sizes(split)):
        try:
            check_delta(privacy.delta, declared)
        except DeltaTooLarge as error:
            raise SimulationError(f"institution {index}: privacy.{error}") from None
        try:
            planned_noise(privacy, scenario.train, declared_examples=declared, rounds=rounds)
        except ValueError as error:  # the target cannot be met at any noise level
            raise SimulationError(
                f"privacy.target_epsilon = {privacy.target_epsilon:g} cannot be met by "
                f"institution {index} (declared size {declared}, {rounds} rounds): {error}"
            ) from None


def run_position(state: Path | None, institutions: int) -> int:
    """How many rounds the virtual institutions' ledgers under `state` already hold: the
    coordinator's central-DP noise of a run that continues them is then drawn afresh (the
    institutions do the same per ledger, see build_client_app)."""
    if state is None:
        return 0
    total = 0
    for index in range(institutions):
        ledger = Ledger(state / f"institution-{index}")
        if ledger.exists():
            total += sum(entry.kind == "spend" for entry in ledger.entries())
    return total


def _checkpointing(
    scenario: ScenarioConfig, folder: Path | None, state: Path | None, resume: Checkpoint | None
) -> Callable[[str], Checkpointing] | None:
    """Where the run checkpoints (its folder; None: nowhere), under the folder's name."""
    if folder is None:
        return None
    from confide.server.checkpoint import Checkpointing, CheckpointStore

    store = CheckpointStore.in_folder(folder)
    saved = scenario.model_dump_json(exclude_none=True)
    ledgers = str(state.resolve()) if state is not None else None
    return lambda this_run: Checkpointing(
        store, folder.resolve().name, this_run, resume=resume, scenario=saved, ledgers=ledgers
    )


def run_scenario(
    scenario: ScenarioConfig,
    *,
    observer: RoundObserver | None = None,
    verbose: bool = False,
    on_split: Callable[[FederatedSplit], None] | None = None,
    state: Path | None = None,
    checkpoint: Path | None = None,
    resume: Checkpoint | None = None,
) -> SimulationOutcome:
    """Partition the data, run every round, and return what the coordinator recorded.

    Virtual institution i keeps its privacy ledger in `state/institution-<i>` (a later run
    given the same `state` continues its spend). Virtual institutions seed their noise from
    the scenario seed and their ledger's position, so the same scenario and starting state
    repeat a run while a run that continues a ledger draws fresh noise; see
    `build_client_app` for why a deployed institution must not seed from anything public.

    With `checkpoint` (the run's folder) the job's checkpoint is written there after every
    round (confide.server.checkpoint), under the folder's name as the job's run identity;
    `resume` (that checkpoint, read back) continues the job after its last round with the
    first run's central noise seed, so the result is the uninterrupted run's.
    """
    source = scenario.data_source(state)
    split = source.split()  # validates the partition before Ray starts
    preflight(scenario, split)
    initial, lineage = starting_model(scenario, source, split)
    if on_split is not None:
        on_split(split)
    job = scenario.job()
    history = JobHistory()
    if resume is not None:
        noise_seed = resume.noise_seed
    else:
        position = run_position(state, scenario.simulation.institutions)
        noise_seed = derive_seed(scenario.seed, "central", position)
    adversity = Adversity(scenario)  # [attack] and [faults]; none: the honest apps
    faulty = adversity.grid_wrapper()
    # Virtual institution i is named "i" by its ClientApp (confide.client.data); without
    # faults the coordinator takes the names from the engine's own node -> partition mapping
    # instead of a query message to every node (10,000 Ray calls at 10,000 institutions).
    # FaultyGrid learns the names from the query's replies, so with faults the nodes are
    # asked, as in deployment without a coordinator.
    # Another Flower release runs its own dispatch, which publishes nothing: ask there too.
    named = faulty is None and engine_supported()
    roster = EngineRoster(timeout=job.federation.timeout) if named else None
    server_app = build_server_app(
        job,
        name=scenario.name,
        history=history,
        observer=observer,
        test_set=split.test,
        noise_seed=noise_seed,
        initial=initial,
        checkpointing=_checkpointing(scenario, checkpoint, state, resume),
        grid_wrapper=_prompt_grid(faulty),
        registered=roster.names if roster is not None else None,
    )
    client_app = adversity.client_app(source, noise_seed=scenario.seed)
    try:
        seconds, peak = simulate(
            server_app, client_app, scenario, verbose=verbose, prompt=True, roster=roster
        )
    except Exception as error:  # run_simulation re-raises the ServerApp's exception
        raise SimulationError(f"the simulation failed: {type(error).__name__}: {error}") from error
    if len(history.rounds) != job.federation.rounds and history.stopped is None:
        raise SimulationError(
            f"the simulation stopped after {len(history.rounds)} of {job.federation.rounds} "
            "rounds; run with --verbose to see Flower's log"
        )
    if not history.rounds and history.stopped is not None:
        raise SimulationError(f"the job did not start: {history.stopped}")
    if not any(record.trained for record in history.rounds):
        # Every update refused or missing, or too few usable ones for the job's min_train.
        noted = [record for record in history.rounds if record.note]
        if noted:
            raise SimulationError(
                f"no round was aggregated (round {noted[0].round}: {noted[0].note})"
            )
        first = history.rejected[0]["reason"] if history.rejected else "no reply"
        raise SimulationError(f"no institution delivered a usable update; first failure: {first}")
    if resume is not None:
        seconds += resume.seconds  # the run's time over its interrupted and resumed parts
    return SimulationOutcome(history, split, seconds, peak, lineage, adversity.events)
