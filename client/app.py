"""The institution's Flower ClientApp (Message API).

- `query`: says who it is (the coordinator builds a roster to sample deterministically);
- `train`: verifies the institution's ledger, checks that the round keeps the dataset within
  the institution's limits over every job ever run on it, loads the global model, trains
  locally (DP-SGD unless the job turns it off), records the round in the ledger and replies
  with weights, the institution's declared size (its weight; its training count is not
  sent) and the privacy spent (this run's and the dataset's), or with a refusal that says
  which limit the round would break or what is wrong with the ledger;
- `evaluate`: scores the global model on the local validation split.

This run's accountant history is also kept in the node's `context.state` (no ledger read per
round); a restarted SuperNode recovers it from the ledger. Raw data never leaves this
function; replies carry weights and aggregates. A reply that reports a problem says what is
wrong in general terms ("its data could not be read", "its ledger failed verification"):
the detail (file paths, the values in a bad row) is logged on this host only.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Error
from flwr.common.constant import ErrorCode

from confide.client.continuity import index_institution_ledger
from confide.client.data import LocalInstitution, Resolver, resolve
from confide.client.device import resolve_device
from confide.client.institution import InstitutionError
from confide.common.seeding import derive_seed
from confide.privacy import instructions as keys
from confide.privacy.accounting import HistoryEntry, epsilon
from confide.privacy.config import PrivacyConfig
from confide.privacy.instructions import RoundInstructions
from confide.privacy.ledger import Ledger, LedgerError, LedgerTampered, Spend, moved_to
from confide.privacy.mechanism import Mechanism, plan_round, planned_noise
from confide.privacy.policy import (
    LEDGER_UNUSABLE,
    REFUSED_BY_POLICY,
    PolicyRefusal,
    check_job_delta,
    check_round,
)
from confide.privacy.report import noise_generator
from confide.privacy.trainer import RoundResult, train_round
from confide.tasks.datasets import DatasetError
from confide.tasks.metrics import evaluate as evaluate_model
from confide.tasks.registry import get_task
from confide.tasks.splits import InstitutionData

HISTORY = "confide.privacy.history"
NOISE = "confide.privacy.noise"
_log = logging.getLogger(__name__)
Handler = Callable[[Message, Context], Message]
# Problems on this host, and what a reply says of each; the detail is logged here only.
_LOCAL = (DatasetError, InstitutionError, OSError)
_LOCAL_PROBLEMS: tuple[tuple[type[Exception], str], ...] = (
    (DatasetError, "its data could not be read"),
    (InstitutionError, "its settings (institution.toml) could not be read"),
    (OSError, "a file on its host could not be read"),
)


def _history(context: Context) -> list[HistoryEntry]:
    if HISTORY not in context.state:
        return []
    record = context.state[HISTORY]
    return list(zip(record["sigma"], record["rate"], record["steps"], strict=True))


@dataclass(frozen=True)
class _Books:
    """What this dataset has spent: in this run (for the job's epsilon) and in every run
    (for the institution's limit); `position` counts the dataset's rounds recorded by other
    runs (it makes a continuing simulation draw fresh noise)."""

    run: list[HistoryEntry]
    dataset: list[HistoryEntry]
    position: int

    @classmethod
    def read(cls, me: LocalInstitution, context: Context) -> _Books:
        """From the ledger (verified; LedgerError if it fails), else the node's state."""
        if me.ledger is None:
            run = _history(context)
            return cls(run, run, 0)
        # One verified read: every spend on the dataset, and which of them were this run's.
        entries = Ledger(me.ledger).entries()
        if (moved := moved_to(entries)) is not None:  # before training; final for the job
            _log.warning("the ledger in %s was moved to %s; train from there", me.ledger, moved)
            raise PolicyRefusal("its ledger was moved to another folder; train from there")
        spends = [e for e in entries if e.kind == "spend" and e.dataset == me.dataset]
        dataset = [entry.history_entry for entry in spends]
        recorded = [entry.history_entry for entry in spends if entry.run == str(context.run_id)]
        # A SuperNode restarted during the job has an empty state: the ledger has the run.
        run = _history(context) or recorded
        return cls(run, dataset, len(dataset) - len(recorded))


def _budget(me: LocalInstitution, privacy: PrivacyConfig) -> tuple[float, str]:
    """(delta, accountant) the dataset's cumulative epsilon is stated with: the institution's."""
    if me.policy is not None:
        return me.policy.max_delta, me.policy.accountant
    return privacy.delta, "rdp"


def _store_history(context: Context, history: list[HistoryEntry]) -> None:
    context.state[HISTORY] = ConfigRecord(
        {
            "sigma": [float(s) for s, _, _ in history],
            "rate": [float(q) for _, q, _ in history],
            "steps": [int(n) for _, _, n in history],
        }
    )


def _mechanism(
    context: Context, instructions: RoundInstructions, declared: int | None
) -> tuple[PrivacyConfig, Mechanism]:
    """The job's privacy terms with sigma fixed, and the round's mechanism, from the
    institution's declared size (PolicyRefusal without one, or if no sigma meets the target).

    Finding the sigma that meets a target epsilon is a search over the accountant that takes
    seconds, and a deployed ClientApp is a new process for every message; the answer depends
    only on the job's terms and the declared size, so it is kept in the node's state.
    """
    if declared is None:
        raise PolicyRefusal(
            "this institution declares no size (institution.toml: declared_examples), which "
            "DP-SGD's sampling rate and the update's weight are computed from; see "
            "docs/privacy.md"
        )
    privacy, train = instructions.privacy, instructions.train
    if privacy.enabled and privacy.noise_multiplier is None:
        key = (
            f"{privacy.target_epsilon}|{privacy.delta}|{privacy.accountant}|{declared}|"
            f"{train.batch_size}|{train.local_epochs}|{instructions.rounds}"
        )
        cache = context.state[NOISE] if NOISE in context.state else ConfigRecord()
        if key not in cache:
            try:
                cache[key] = planned_noise(
                    privacy, train, declared_examples=declared, rounds=instructions.rounds
                )
            except ValueError as error:  # no sigma meets the target
                raise PolicyRefusal(f"the job's target epsilon cannot be met: {error}") from None
            context.state[NOISE] = cache
        privacy = privacy.model_copy(
            update={"noise_multiplier": float(cache[key]), "target_epsilon": None}
        )
    mechanism = plan_round(
        privacy, train, declared_examples=declared, planned_rounds=instructions.rounds
    )
    return privacy, mechanism


def _model(
    instructions: RoundInstructions, local: InstitutionData, arrays: ArrayRecord
) -> torch.nn.Module:
    """The task's model with the coordinator's weights loaded (names and shapes must match)."""
    task = instructions.task
    features = instructions.features or local.train.features
    classes = len(instructions.labels) if instructions.labels else local.train.classes
    model = get_task(task.name).build_model(task, features, classes, instructions.seed)
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


def _one_thread() -> None:
    # Module-level on purpose: Ray pickles the ClientApp's closures by value, and a closure
    # that names `torch` directly drags the module into the pickle (which fails).
    torch.set_num_threads(1)  # one institution per core in simulation; threads only contend


def _check(
    me: LocalInstitution,
    context: Context,
    instructions: RoundInstructions,
) -> tuple[PrivacyConfig, Mechanism, _Books]:
    """Everything decided before training, from public values and the ledger only:
    PolicyRefusal or LedgerError if the round must not run."""
    privacy, mechanism = _mechanism(context, instructions, me.declared_examples)
    books = _Books.read(me, context)
    check_job_delta(privacy, mechanism)
    if me.policy is not None:
        check_round(me.policy, privacy, mechanism=mechanism, history=books.dataset)
    return privacy, mechanism, books


def _reply(
    me: LocalInstitution,
    privacy: PrivacyConfig,
    mechanism: Mechanism,
    result: RoundResult,
    *,
    dataset: list[HistoryEntry],
    generator: str,
) -> RecordDict:
    """The train reply: weights, the numbers (weight = the declared size, not the training
    set's size) and how the round was run."""
    budget_delta, budget_accountant = _budget(me, privacy)
    metrics: dict[str, int | float] = {
        "num-examples": mechanism.declared_examples,
        keys.STEPS: result.steps,
        keys.DP_ENABLED: int(privacy.enabled),
        keys.DATASET_EPSILON: epsilon(dataset, budget_delta, budget_accountant),
        keys.DATASET_DELTA: budget_delta,
    }
    if privacy.enabled:
        metrics |= {
            keys.EPSILON: result.epsilon,
            keys.DELTA: result.delta,
            keys.NOISE_MULTIPLIER: result.noise_multiplier,
            keys.SAMPLE_RATE: result.sample_rate,
            keys.TOTAL_STEPS: sum(n for _, _, n in result.history),
        }
    return RecordDict(
        {
            "arrays": ArrayRecord(result.state),
            "metrics": MetricRecord(metrics),
            "identity": ConfigRecord({"institution": me.name}),
            keys.MECHANISM: ConfigRecord(
                {keys.NOISE_GENERATOR: generator, keys.DATASET_ACCOUNTANT: budget_accountant}
            ),
        }
    )


def _ledger_problem(problem: LedgerError) -> str:
    """What a reply says of a ledger that cannot be used (its detail names this host's
    files, and is logged here)."""
    _log.error("the privacy ledger cannot be used: %s", problem)
    if isinstance(problem, LedgerTampered):
        return (
            "its ledger failed verification (its operator checks it with "
            "`confide-client budget verify`)"
        )
    return "its ledger cannot be used on its host now (its operator must fix the cause)"


def _local_failure(
    message: Message, context: Context, resolver: Resolver, error: Exception
) -> Message:
    """The error reply for a problem on this host (data, settings, files): what kind of
    problem, never its detail, which names paths and may quote the data's values."""
    what = next(text for kind, text in _LOCAL_PROBLEMS if isinstance(error, kind))
    _log.error("a %s message failed here: %s", message.metadata.message_type, error)
    try:
        name = resolver(context).name
    except _LOCAL:
        name = "the institution"
    reason = f"{name} cannot answer a {message.metadata.message_type} message: {what}"
    return Message(
        error=Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{reason} (details in its log)"),
        reply_to=message,
    )


def _kept_local(resolver: Resolver) -> Callable[[Handler], Handler]:
    """Handlers whose local problems are replied to by kind (`_local_failure`): Flower
    would send the exception's text, which names this host's files and data."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def guarded(message: Message, context: Context) -> Message:
            try:
                return handler(message, context)
            except _LOCAL as error:
                return _local_failure(message, context, resolver, error)

        return guarded

    return wrap


def build_client_app(resolver: Resolver = resolve, noise_seed: int | None = None) -> ClientApp:
    """A ClientApp for the institution `resolver` finds in each message's context (by default
    a deployed institution's state directory, or the run's simulated partition).

    `noise_seed` is the institution's own: with None (the default) every round's Poisson
    sampling (and, with the "torch" noise source, the Gaussian noise) is seeded from the
    operating system's CSPRNG, so nobody, the coordinator included, can regenerate it. A
    simulation sets it to make runs reproducible: the round's seed then also depends on how
    many rounds the institution's ledger holds from earlier runs, so a run that continues a
    ledger draws fresh batches and noise. The coordinator's messages never choose it.
    """
    app = ClientApp()

    def round_seed(server_round: int, institution: str, position: int) -> int:
        if noise_seed is None:
            return secrets.randbits(63)
        return derive_seed(noise_seed, "train", position, server_round, institution)

    @app.query()
    @_kept_local(resolver)
    def query(message: Message, context: Context) -> Message:
        reply = RecordDict({"identity": ConfigRecord({"institution": resolver(context).name})})
        return Message(reply, reply_to=message)

    @app.train()
    @_kept_local(resolver)
    def train(message: Message, context: Context) -> Message:
        instructions = RoundInstructions.from_config(message.content["config"])
        server_round = int(message.content["config"]["server-round"])
        me: LocalInstitution = resolver(context)
        if me.single_thread:
            _one_thread()
        institution = me.name
        try:
            privacy, mechanism, books = _check(me, context, instructions)
        except PolicyRefusal as refusal:
            reason = f"{institution} refuses round {server_round}: {refusal}"
            return Message(error=Error(REFUSED_BY_POLICY, reason), reply_to=message)
        except LedgerError as problem:  # not final: an operator can fix it during the job
            reason = f"{institution} cannot train round {server_round}: {_ledger_problem(problem)}"
            return Message(error=Error(LEDGER_UNUSABLE, reason), reply_to=message)
        local = me.load(instructions)
        model = _model(instructions, local, message.content["arrays"])
        result = train_round(
            model,
            local.train,
            instructions.train,
            privacy,
            mechanism=mechanism,
            history=books.run,
            seed=round_seed(server_round, institution, books.position),
            device=resolve_device(me.device),
            noise_source=me.noise_source,
        )
        spend = Spend(
            dataset=me.dataset,
            fingerprint=me.fingerprint(),
            job=instructions.job,
            run=str(context.run_id),
            round=server_round,
            examples=result.examples,
            sample_rate=mechanism.sample_rate,
            noise_multiplier=mechanism.noise_multiplier,
            steps=result.steps,  # the mechanism's with DP; without, the shuffled epochs' steps
            delta=privacy.delta,
            accountant=privacy.accountant,
        )
        # Recorded before the update leaves: a crash loses the update, never the record.
        if me.ledger is not None:
            try:
                Ledger(me.ledger).record(spend)
            except LedgerError as problem:
                reason = f"{institution} cannot record round {server_round}: " + _ledger_problem(
                    problem
                )
                return Message(error=Error(LEDGER_UNUSABLE, reason), reply_to=message)
            # So that a later `join` elsewhere on this host finds this data's budget.
            index_institution_ledger(me.ledger, [spend.fingerprint])
        _store_history(context, result.history)
        reply = _reply(
            me,
            privacy,
            mechanism,
            result,
            dataset=[*books.dataset, spend.history_entry],
            generator=noise_generator(me.noise_source, noise_seed),
        )
        return Message(reply, reply_to=message)

    @app.evaluate()
    @_kept_local(resolver)
    def evaluate(message: Message, context: Context) -> Message:
        instructions = RoundInstructions.from_config(message.content["config"])
        me = resolver(context)
        if me.single_thread:
            _one_thread()
        institution, local = me.name, me.load(instructions)
        metrics: dict[str, float | int] = {"num-examples": len(local.validation)}
        if len(local.validation):
            model = _model(instructions, local, message.content["arrays"])
            scores = evaluate_model(
                model, local.validation.x, local.validation.y, local.validation.classes
            )
            metrics |= {k: v for k, v in scores.items() if k != "auroc"}
        reply = RecordDict(
            {
                "metrics": MetricRecord(metrics),
                "identity": ConfigRecord({"institution": institution}),
            }
        )
        return Message(reply, reply_to=message)

    return app


# Entry point of `flwr run` (the project's pyproject and every job `confide-server submit`
# sends): a deployed institution when the SuperNode names its state directory.
app = build_client_app()
