"""What the coordinator makes of institutions' replies: which count, and what each spent.

An update counts if its arrays have the global model's names, shapes and dtypes and hold
only finite numbers, if its change from the global model is within the job's
`aggregation.max_update_norm` (L2, when set), and if it declares at least one example (its
weight). Whether it counts
or not, an institution that trained has spent privacy: its reported spend is recorded
first. Every reply that does not count is kept in the job's record (`rejected`), with who
refused it: the institution (its error reply) or the coordinator. Replies are handled in
institution order, so that aggregation sums in the same order on every run.

Who a reply is from is read from the message it answers (the node it was sent to), not from
its sender: when a node goes offline the SuperLink answers for it (Flower's NODE_UNAVAILABLE
error, sent by the SuperLink's own node id). Every institution asked that sent no reply
before the round's timeout is recorded too (`refused_by` "unanswered"), so that a round's
record accounts for every message the coordinator sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from confide.common.errors import UpdateRejected
from confide.privacy import instructions as keys
from confide.privacy.policy import APP_REFUSED, REFUSED_BY_POLICY
from confide.server.aggregation import WEIGHT_KEY, Update, update_norm
from confide.server.history import InstitutionSpend, JobHistory
from confide.server.sampling import Roster

# Refusals an institution repeats for every later round of the same job: its spend only
# grows and the job's sigma is fixed (its limits); the job's app does not change (app check).
# What an institution's data commitment looks like (privacy.ledger.Ledger.commitment); anything
# else it sends in that field is not recorded.
COMMITMENT = re.compile(r"hmac-sha256:[0-9a-f]{64}")
FINAL_REFUSALS = {REFUSED_BY_POLICY: "its privacy limits", APP_REFUSED: "its app check"}
# ... of which these refuse evaluation too (an app refused runs nothing).
REFUSING_EVALUATION = {APP_REFUSED}
# Errors the SuperLink sends for a node that went offline or a reply that expired: nobody
# refused anything, the institution did not answer.
UNANSWERED_CODES = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}


def check_update(global_arrays: ArrayRecord, update: ArrayRecord) -> None:
    """Refuse an update whose arrays differ in name, shape or dtype, or hold NaN/inf."""
    if set(update) != set(global_arrays):
        raise UpdateRejected(f"array names differ: {sorted(set(update) ^ set(global_arrays))}")
    for name, array in update.items():
        expected = global_arrays[name]
        if array.shape != expected.shape or array.dtype != expected.dtype:
            raise UpdateRejected(
                f"{name}: got {array.dtype}{list(array.shape)}, "
                f"expected {expected.dtype}{list(expected.shape)}"
            )
        if not np.isfinite(array.numpy()).all():
            raise UpdateRejected(f"{name}: contains NaN or infinity")


@dataclass(frozen=True)
class Scored:
    """One institution's federated evaluation: its metrics on `examples` validation examples."""

    institution: str
    metrics: dict[str, float]
    examples: int


class Replies:
    """Validates replies and keeps the job's record of refusals and privacy spend."""

    def __init__(
        self, history: JobHistory, roster: Roster, *, max_update_norm: float | None = None
    ) -> None:
        self.history = history
        self.roster = roster
        # aggregation.max_update_norm: a bound on ||w_i - w_t||, None for none.
        self.max_update_norm = max_update_norm

    def train(
        self,
        server_round: int,
        replies: Iterable[Message],
        global_arrays: ArrayRecord,
        *,
        asked: Sequence[Message] = (),
    ) -> tuple[list[Update], dict[str, float]]:
        """The usable updates, in institution order, and the cumulative epsilon of each
        institution that sent one; the spend of every institution that reported one is
        recorded, its update refused or not. `asked`: the train messages the replies answer
        (after the grid pushed them: with their ids)."""
        accepted = []
        epsilons: dict[str, float] = {}
        for institution, reply in self._ordered(replies, server_round, "train", asked):
            try:
                metrics = reply.content.metric_records["metrics"]
                # Privacy was spent whether or not the update is usable: record it first.
                record_spend(self.history.spend(institution), metrics, reply.content)
                # As declared (Flower's weighting reads it so); a list fails int() below.
                weight = cast(float, metrics[WEIGHT_KEY])
                if int(weight) < 1:
                    raise UpdateRejected("num-examples must be at least 1")
                arrays = reply.content.array_records["arrays"]
                check_update(global_arrays, arrays)
                bound = self.max_update_norm
                if bound is not None and (norm := update_norm(global_arrays, arrays)) > bound:
                    raise UpdateRejected(
                        f"update norm {norm:.6g} exceeds aggregation.max_update_norm {bound:g}"
                    )
            except (UpdateRejected, KeyError, TypeError, ValueError) as error:
                reason = f"{type(error).__name__}: {error}"
                self._reject(institution, server_round, "train", reason, by="coordinator")
                continue
            accepted.append(Update(institution, arrays, weight))
            epsilons[institution] = self.history.spend(institution).epsilon
        return accepted, epsilons

    def evaluate(
        self, server_round: int, replies: Iterable[Message], *, asked: Sequence[Message] = ()
    ) -> list[Scored]:
        """Usable evaluation replies, in institution order (each institution's validation
        size is recorded); `asked` as for `train`."""
        scored = []
        for institution, reply in self._ordered(replies, server_round, "evaluate", asked):
            try:
                replied = reply.content.metric_records["metrics"]
                metrics = {key: _float(value) for key, value in replied.items()}
                examples = int(metrics.pop(WEIGHT_KEY))
            except (KeyError, TypeError, ValueError) as error:
                reason = f"{type(error).__name__}: {error}"
                self._reject(institution, server_round, "evaluate", reason, by="coordinator")
                continue
            self.history.spend(institution).validation_examples = examples
            scored.append(Scored(institution, metrics, examples))
        return scored

    def _ordered(
        self,
        replies: Iterable[Message],
        server_round: int,
        phase: str,
        asked: Sequence[Message],
    ) -> list[tuple[str, Message]]:
        """Replies without errors, in institution order; errors are recorded and dropped, a
        refusal that holds for the whole job takes the institution off the roster, and each
        institution asked that did not reply is recorded as unanswered."""
        sent = {
            m.metadata.message_id: m.metadata.dst_node_id for m in asked if m.metadata.message_id
        }
        # In institution order before anything is recorded: replies arrive in whatever order
        # the institutions finish, and the job's record must not depend on it.
        arrived = []
        for reply in replies:
            node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            arrived.append((node, self.roster.name(node), reply))
        named = []
        for _, institution, reply in sorted(arrived, key=lambda item: item[1]):
            if not reply.has_error():
                named.append((institution, reply))
                continue
            code = reply.error.code
            reason = reply.error.reason or f"error code {code}"
            if code in UNANSWERED_CODES or reply.metadata.src_node_id == SUPERLINK_NODE_ID:
                self._reject(institution, server_round, phase, reason, by="unanswered")
                continue
            self._reject(institution, server_round, phase, reason, by="institution")
            if code in FINAL_REFUSALS:
                evaluation = code in REFUSING_EVALUATION
                self.roster.exclude(institution, FINAL_REFUSALS[code], evaluation=evaluation)
        answered = {node for node, _, _ in arrived}
        timeout = self.roster.federation.timeout
        silent = sorted(
            self.roster.name(node) for node in {m.metadata.dst_node_id for m in asked} - answered
        )
        for institution in silent:
            reason = (
                f"no {phase} reply within the round's timeout (federation.timeout {timeout:g} s)"
            )
            self._reject(institution, server_round, phase, reason, by="unanswered")
        return named

    def _reject(
        self, institution: str, server_round: int, phase: str, reason: str, *, by: str
    ) -> None:
        """Record a reply that did not count: refused by the institution (its error reply),
        by the coordinator (an update or metrics it could not use), or `unanswered` (no reply
        before the timeout, or the SuperLink's report that the node went offline)."""
        if by == "unanswered":
            log(WARNING, "round %d: institution %s: %s", server_round, institution, reason)
        else:
            log(
                WARNING,
                "round %d: %s reply from %s refused by the %s: %s",
                server_round,
                phase,
                institution,
                by,
                reason,
            )
        self.history.rejected.append(
            {
                "institution": institution,
                "round": server_round,
                "phase": phase,
                "reason": reason,
                "refused_by": by,
            }
        )


def record_spend(spend: InstitutionSpend, metrics: MetricRecord, content: RecordDict) -> None:
    """Update an institution's cumulative spend from its train reply (KeyError if incomplete).

    Cumulative epsilon never goes down: an institution that lost its history (or misreports)
    must not lower what this job records."""
    if (mechanism := content.config_records.get(keys.MECHANISM)) is not None:
        spend.noise_generator = str(mechanism.get(keys.NOISE_GENERATOR, "")) or None
        spend.dataset_accountant = str(mechanism.get(keys.DATASET_ACCOUNTANT, "")) or None
        commitment = str(mechanism.get(keys.DATA_COMMITMENT, ""))
        spend.data_commitment = commitment if COMMITMENT.fullmatch(commitment) else None
    if _int(metrics[keys.DP_ENABLED]):
        reported = _float(metrics[keys.EPSILON])
        if reported < spend.epsilon:
            log(
                WARNING,
                "%s reported epsilon %.3f, below the %.3f it reported before; keeping %.3f",
                spend.institution,
                reported,
                spend.epsilon,
                spend.epsilon,
            )
        spend.epsilon = max(spend.epsilon, reported)
        spend.noise_multiplier = _float(metrics[keys.NOISE_MULTIPLIER])
        spend.sample_rate = _float(metrics[keys.SAMPLE_RATE])
        spend.steps = _int(metrics[keys.TOTAL_STEPS])
    else:
        spend.steps += _int(metrics[keys.STEPS])
    spend.rounds_trained += 1
    if keys.ROUNDS_RECORDED in metrics:  # its ledger's count never goes down either
        spend.rounds_recorded = max(spend.rounds_recorded or 0, _int(metrics[keys.ROUNDS_RECORDED]))
    spend.declared_examples = _int(metrics[WEIGHT_KEY])
    if keys.DATASET_EPSILON in metrics:
        spend.dataset_epsilon = max(
            spend.dataset_epsilon or 0.0, _float(metrics[keys.DATASET_EPSILON])
        )
        spend.dataset_delta = _float(metrics[keys.DATASET_DELTA])


# A reply's values are whatever the institution sent: a list (or text) fails here as int()
# and float() fail on it, and the reply is refused with that error.
def _int(value: object) -> int:
    return int(cast(float, value))


def _float(value: object) -> float:
    return float(cast(float, value))
