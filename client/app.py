"""The institution's Flower ClientApp (Message API).

- `query`: says who it is (the coordinator builds a roster to sample deterministically);
- `train`: verifies the institution's ledger and checks that the round keeps the dataset within
  the institution's limits over every job ever run on it (one step, `admit_round`), loads the
  global model, trains locally (DP-SGD unless the job turns it off), records the round in
  the ledger and replies with weights, the institution's declared size (its weight; its
  training count is not sent) and the privacy spent (this run's and the dataset's), or with
  a refusal that says which limit the round would break or what is wrong with the ledger;
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
from typing import cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.typing import ConfigRecordValues, MetricRecordValues
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
    record = context.state.config_records[HISTORY]
    sigmas = cast(list[float], record["sigma"])
    rates = cast(list[float], record["rate"])
    steps = cast(list[int], record["steps"])
    return list(zip(sigmas, rates, steps, strict=True))


@dataclass(frozen=True)
class _Books:
    """What this dataset has spent: in this run (for the job's epsilon) and in every run
    (for the institution's limit); `position` counts the dataset's rounds recorded by other
    runs (it makes a continuing simulation draw fresh noise); `recorded` how many rounds the
    ledger holds for this run (a round recorded whose update was lost counts: it was spent).

    "This run" is the job's run identity (`run_identity`), which a resumed job keeps."""

    run: list[HistoryEntry]
    dataset: list[HistoryEntry]
    position: int
    recorded: int | None  # None without a ledger: nothing is recorded

    @classmethod
    def read(cls, me: LocalInstitution, context: Context, identity: str) -> _Books:
        """From the ledger (verified; LedgerError if it fails), else the node's state."""
        if me.ledger is None:
            run = _history(context)
            return cls(run, run, 0, None)
        # One verified read: every spend on the dataset, and which of them were this run's.
        entries = Ledger(me.ledger).entries()
        if (moved := moved_to(entries)) is not None:  # before training; final for the job
            _log.warning("the ledger in %s was moved to %s; train from there", me.ledger, moved)
            raise PolicyRefusal("its ledger was moved to another folder; train from there")
        spends = [e for e in entries if e.kind == "spend" and e.dataset == me.dataset]
        dataset = [entry.history_entry for entry in spends]
        recorded = [entry.history_entry for entry in spends if entry.run == identity]
        # A SuperNode restarted during the job, or a job resumed in a new Flower run, has an
        # empty state: the ledger has the run.
        run = _history(context) or recorded
        return cls(run, dataset, len(dataset) - len(recorded), len(recorded))


def run_identity(instructions: RoundInstructions, context: Context) -> str:
    """The job's run identity its ledger entries are keyed by: the one the coordinator names
    (kept when it resumes the job in a new Flower run), else this Flower run's id. Whatever
    the coordinator names, the dataset's limit counts every entry of the ledger."""
    return instructions.run or str(context.run_id)


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
        cache = context.state.config_records.get(NOISE, ConfigRecord())
        if key not in cache:
            try:
                cache[key] = planned_noise(
                    privacy, train, declared_examples=declared, rounds=instructions.rounds
                )
            except ValueError as error:  # no sigma meets the target
                raise PolicyRefusal(f"the job's target epsilon cannot be met: {error}") from None
            context.state[NOISE] = cache
        sigma = cast(float, cache[key])
        privacy = privacy.model_copy(update={"noise_multiplier": sigma, "target_epsilon": None})
    mechanism = plan_round(
        privacy, train, declared_examples=declared, planned_rounds=instructions.rounds
    )
    return privacy, mechanism


def _model(
    instructions: RoundInstructions, local: InstitutionData, arrays: ArrayRecord
) -> torch.nn.Module:
    """The task's model with the coordinator's weights loaded (names and shapes must match)."""
    task = instructions.task
    shape = instructions.input_shape() or local.train.shape
    classes = len(instructions.labels) if instructions.labels else local.train.classes
    model = get_task(task.name).build_model(
        task, shape=shape, classes=classes, seed=instructions.seed
    )
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


def _one_thread() -> None:
    # Module-level on purpose: Ray pickles the ClientApp's closures by value, and a closure
    # that names `torch` directly drags the module into the pickle (which fails).
    torch.set_num_threads(1)  # one institution per core in simulation; threads only contend


def _reply(
    me: LocalInstitution,
    privacy: PrivacyConfig,
    mechanism: Mechanism,
    result: RoundResult,
    *,
    dataset: list[HistoryEntry],
    generator: str,
    recorded: int | None,
) -> RecordDict:
    """The train reply: weights, the numbers (weight = the declared size, not the training
    set's size), how many rounds of this job the institution has recorded (`recorded`) and
    how the round was run."""
    budget_delta, budget_accountant = _budget(me, privacy)
    metrics: dict[str, MetricRecordValues] = {
        "num-examples": mechanism.declared_examples,
        keys.STEPS: result.steps,
        keys.DP_ENABLED: int(privacy.enabled),
        keys.DATASET_EPSILON: epsilon(dataset, budget_delta, budget_accountant),
        keys.DATASET_DELTA: budget_delta,
    }
    if recorded is not None:
        metrics[keys.ROUNDS_RECORDED] = recorded
    if privacy.enabled:
        metrics |= {
            keys.EPSILON: result.epsilon,
            keys.DELTA: result.delta,
            keys.NOISE_MULTIPLIER: result.noise_multiplier,
            keys.SAMPLE_RATE: result.sample_rate,
            keys.TOTAL_STEPS: sum(n for _, _, n in result.history),
        }
    how: dict[str, ConfigRecordValues] = {
        keys.NOISE_GENERATOR: generator,
        keys.DATASET_ACCOUNTANT: budget_accountant,
    }
    if me.ledger is not None:  # read back by the coordinator into the model's card
        how[keys.DATA_COMMITMENT] = Ledger(me.ledger).commitment(me.fingerprint())
    return RecordDict(
        {
            "arrays": ArrayRecord(result.state),
            "metrics": MetricRecord(metrics),
            "identity": ConfigRecord({"institution": me.name}),
            keys.MECHANISM: ConfigRecord(how),
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


@dataclass(frozen=True)
class TrainRequest:
    """A train message as this institution reads it: the round's instructions (parsed with
    the coordinator's own models, see RoundInstructions) and who answers."""

    message: Message
    context: Context
    me: LocalInstitution
    instructions: RoundInstructions
    server_round: int

    @classmethod
    def read(cls, message: Message, context: Context, resolver: Resolver) -> TrainRequest:
        config = message.content.config_records["config"]
        instructions = RoundInstructions.from_config(dict(config))
        server_round = int(cast(int, config["server-round"]))
        return cls(message, context, resolver(context), instructions, server_round)

    def refuse(self, code: int, reason: str) -> Message:
        """The error reply with one of confide's codes (confide.privacy.policy)."""
        return Message(error=Error(code, reason), reply_to=self.message)


@dataclass(frozen=True)
class Admitted:
    """What a round that passed the institution's checks trains with: the job's privacy
    terms with sigma fixed, the round's mechanism, and the dataset's books."""

    privacy: PrivacyConfig
    mechanism: Mechanism
    books: _Books


def admit_round(request: TrainRequest) -> Admitted | Message:
    """The institution's limit check, before anything of the round runs: verify the ledger
    and check the round against the institution's limits, from public values and the ledger
    only (a refusal reveals nothing about this round's examples).

    Returns what training needs, or the refusal reply: REFUSED_BY_POLICY when the round would
    break a limit (the job's delta not below 1/N, DP off where required, the dataset's
    cumulative epsilon over every job past max_epsilon: final for the job), no sigma meets
    the job's target, no size is declared or the ledger was moved; LEDGER_UNUSABLE when the
    ledger fails verification or cannot be read (not final: an operator can fix it).
    """
    me, context, instructions = request.me, request.context, request.instructions
    try:
        privacy, mechanism = _mechanism(context, instructions, me.declared_examples)
        books = _Books.read(me, context, run_identity(instructions, context))
        check_job_delta(privacy, mechanism)
        if me.policy is not None:
            check_round(me.policy, privacy, mechanism=mechanism, history=books.dataset)
    except PolicyRefusal as refusal:
        reason = f"{me.name} refuses round {request.server_round}: {refusal}"
        return request.refuse(REFUSED_BY_POLICY, reason)
    except LedgerError as problem:
        problem_text = _ledger_problem(problem)
        reason = f"{me.name} cannot train round {request.server_round}: {problem_text}"
        return request.refuse(LEDGER_UNUSABLE, reason)
    return Admitted(privacy, mechanism, books)


def _train_locally(request: TrainRequest, admitted: Admitted, seed: int) -> RoundResult:
    """One round of local training on the institution's data, from the coordinator's model."""
    me, instructions = request.me, request.instructions
    local = me.load(instructions)
    model = _model(instructions, local, request.message.content.array_records["arrays"])
    return train_round(
        model,
        local.train,
        train=instructions.train,
        privacy=admitted.privacy,
        mechanism=admitted.mechanism,
        history=admitted.books.run,
        seed=seed,
        device=resolve_device(me.device),
        noise_source=me.noise_source,
    )


def _record(request: TrainRequest, admitted: Admitted, result: RoundResult) -> Spend | Message:
    """The round's spend, recorded in the ledger before the update leaves (a crash loses the
    update, never the record); the LEDGER_UNUSABLE reply if it cannot be recorded."""
    me, privacy, mechanism = request.me, admitted.privacy, admitted.mechanism
    spend = Spend(
        dataset=me.dataset,
        fingerprint=me.fingerprint(),
        job=request.instructions.job,
        run=run_identity(request.instructions, request.context),
        round=request.server_round,
        examples=result.examples,
        sample_rate=mechanism.sample_rate,
        noise_multiplier=mechanism.noise_multiplier,
        steps=result.steps,  # the mechanism's with DP; without, the shuffled epochs' steps
        delta=privacy.delta,
        accountant=privacy.accountant,
    )
    if me.ledger is not None:
        try:
            Ledger(me.ledger).record(spend)
        except LedgerError as problem:
            reason = f"{me.name} cannot record round {request.server_round}: " + _ledger_problem(
                problem
            )
            return request.refuse(LEDGER_UNUSABLE, reason)
        # So that a later `join` elsewhere on this host finds this data's budget.
        index_institution_ledger(me.ledger, [spend.fingerprint])
    return spend


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
    guarded = _kept_local(resolver)
    app.query()(guarded(_query_handler(resolver)))
    app.train()(guarded(_train_handler(resolver, noise_seed)))
    app.evaluate()(guarded(_evaluate_handler(resolver)))
    return app


def _round_seed(noise_seed: int | None, server_round: int, institution: str, position: int) -> int:
    """The seed of the round's batches (and torch noise): see build_client_app."""
    if noise_seed is None:
        return secrets.randbits(63)
    return derive_seed(noise_seed, "train", position, server_round, institution)


def _query_handler(resolver: Resolver) -> Handler:
    def query(message: Message, context: Context) -> Message:
        reply = RecordDict({"identity": ConfigRecord({"institution": resolver(context).name})})
        return Message(reply, reply_to=message)

    return query


def _train_handler(resolver: Resolver, noise_seed: int | None) -> Handler:
    """Admit the round (`admit_round`), train, record the spend, reply."""

    def train(message: Message, context: Context) -> Message:
        request = TrainRequest.read(message, context, resolver)
        me = request.me
        if me.single_thread:
            _one_thread()
        admitted = admit_round(request)
        if isinstance(admitted, Message):
            return admitted
        books = admitted.books
        position = books.position
        seed = _round_seed(noise_seed, request.server_round, me.name, position)
        result = _train_locally(request, admitted, seed)
        spend = _record(request, admitted, result)
        if isinstance(spend, Message):
            return spend
        _store_history(context, result.history)
        reply = _reply(
            me,
            admitted.privacy,
            admitted.mechanism,
            result,
            dataset=[*admitted.books.dataset, spend.history_entry],
            generator=noise_generator(me.noise_source, noise_seed),
            recorded=None if books.recorded is None else books.recorded + 1,  # with this one
        )
        return Message(reply, reply_to=message)

    return train


def _evaluate_handler(resolver: Resolver) -> Handler:
    def evaluate(message: Message, context: Context) -> Message:
        config = message.content.config_records["config"]
        instructions = RoundInstructions.from_config(dict(config))
        me = resolver(context)
        if me.single_thread:
            _one_thread()
        institution, local = me.name, me.load(instructions)
        metrics: dict[str, MetricRecordValues] = {"num-examples": len(local.validation)}
        if len(local.validation):
            arrays = message.content.array_records["arrays"]
            model = _model(instructions, local, arrays).to(resolve_device(me.device))
            scores = evaluate_model(
                model,
                local.validation.x,
                local.validation.y,
                classes=local.validation.classes,
                extra=get_task(instructions.task.name).metrics,
            )
            metrics |= {k: v for k, v in scores.items() if k != "auroc"}
        reply = RecordDict(
            {
                "metrics": MetricRecord(metrics),
                "identity": ConfigRecord({"institution": institution}),
            }
        )
        return Message(reply, reply_to=message)

    return evaluate


# Entry point of `flwr run` (the project's pyproject and every job `confide-server submit`
# sends): a deployed institution when the SuperNode names its state directory.
app = build_client_app()
