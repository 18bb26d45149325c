"""Unreliable virtual institutions: a scenario's `[faults]` table (simulation only).

Each round, each institution asked to train meets at most one fault, drawn from one uniform
u in [0, 1) seeded by (scenario seed, "faults", round, institution): a dropout if
u < dropout, a straggler if u < dropout + straggler, a crash if u < dropout + straggler +
crash (so each happens with exactly its probability, and the three exclude each other).
`institutions` restricts the faults to those virtual institutions. Only training is
affected: evaluation messages always arrive and are answered.

- dropout: the train message is never delivered (`FaultyGrid` does not push it): the
  institution neither trains nor spends, and no reply comes. A real coordinator would wait
  for it until the round's timeout; here the round ends when the others have answered.
- straggler: the message is delivered, the institution trains and records its spend in its
  ledger, and its reply is discarded, as one arriving after the round's timeout is. A real
  delay would hold a Ray worker (and the round) for the whole timeout; discarding the reply
  is what the coordinator would see, without the wait.
- crash: the institution's ClientApp loads its data and fails before it trains or records
  anything: the coordinator gets the error reply Flower sends for a ClientApp that raised
  (code CLIENT_APP_RAISED_EXCEPTION; `crash_reply`). The app answers with it rather than
  raising: Flower's reason for a raised exception in simulation is Ray's whole traceback,
  which would fill the log and results.json's `rejected_updates` with it.

The coordinator learns nothing of the schedule: it sees missing replies and error replies,
as it would in deployment. `FaultyGrid` records every fault it applies or schedules
(`events`), which results.json's `faults` lists.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Self, cast

from flwr.app import Message, MessageType, RecordDict
from flwr.common import Error
from flwr.common.constant import ErrorCode
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from pydantic import Field, field_validator, model_validator

from confide.common.config import StrictModel
from confide.common.seeding import derive_seed
from confide.server.results import FaultEvent, FaultKind, FaultsRecord

SERVER_ROUND = "server-round"  # the round, in every train message's config (strategy)


class FaultsConfig(StrictModel):
    """`[faults]`: the probability of each fault, per institution asked and round."""

    dropout: float = Field(default=0.0, ge=0.0, le=1.0, description="the message never arrives")
    straggler: float = Field(
        default=0.0, ge=0.0, le=1.0, description="the reply comes after the round's timeout"
    )
    crash: float = Field(default=0.0, ge=0.0, le=1.0, description="the ClientApp fails mid-round")
    institutions: list[int] | None = Field(
        default=None, min_length=1, description="only these virtual institutions (indices)"
    )

    @field_validator("institutions")
    @classmethod
    def _distinct_indices(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(set(value)) != len(value) or min(value) < 0):
            raise ValueError("institutions must be distinct indices, 0 or more")
        return value

    @model_validator(mode="after")
    def _at_most_one_fault(self) -> Self:
        # One draw decides all three: their probabilities share [0, 1).
        if self.dropout + self.straggler + self.crash > 1.0:
            raise ValueError("faults.dropout + straggler + crash must not exceed 1")
        return self


@dataclass(frozen=True)
class FaultPlan:
    """Who meets which fault in which round: the same on both sides (the grid wrapper and
    the ClientApp compute it, nothing travels). Picklable: Ray ships it."""

    seed: int
    dropout: float
    straggler: float
    crash: float
    institutions: frozenset[str] | None  # names; None: every institution

    @classmethod
    def of(cls, faults: FaultsConfig, *, seed: int) -> FaultPlan:
        chosen = faults.institutions
        names = None if chosen is None else frozenset(str(index) for index in chosen)
        return cls(seed, faults.dropout, faults.straggler, faults.crash, names)

    def fault(self, *, server_round: int, institution: str) -> FaultKind | None:
        """The fault `institution` meets if asked to train in round `server_round`."""
        if self.institutions is not None and institution not in self.institutions:
            return None
        u = random.Random(derive_seed(self.seed, "faults", server_round, institution)).random()
        for kind, bound in (
            ("dropout", self.dropout),
            ("straggler", self.dropout + self.straggler),
            ("crash", self.dropout + self.straggler + self.crash),
        ):
            if u < bound:
                return cast(FaultKind, kind)
        return None

    def schedule(self, *, rounds: int, institutions: Iterable[str]) -> list[FaultEvent]:
        """Every fault of `rounds` rounds if all of `institutions` were asked every round."""
        names = sorted(institutions)
        return [
            FaultEvent(round=r, institution=name, kind=kind)
            for r in range(1, rounds + 1)
            for name in names
            if (kind := self.fault(server_round=r, institution=name)) is not None
        ]


def crash_reply(message: Message, *, institution: str, server_round: int) -> Message:
    """The error reply of an institution whose ClientApp crashed mid-round."""
    reason = f"institution {institution} crashed in round {server_round} (a simulated fault)"
    return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)


def _train_round(message: Message) -> int | None:
    """The round of a train message, None for any other message."""
    if message.metadata.message_type != MessageType.TRAIN:
        return None
    return int(cast(int, message.content.config_records["config"][SERVER_ROUND]))


class FaultyGrid(Grid):
    """A grid that applies `plan` to the train messages confide's strategy sends through
    `send_and_receive` (its only use of a grid for training); everything else is the wrapped
    grid's. Institutions are named from their replies to the roster's query (a simulated
    node id is random)."""

    def __init__(self, grid: Grid, plan: FaultPlan) -> None:
        self._grid = grid
        self.plan = plan
        self.names: dict[int, str] = {}  # node id -> institution
        self.events: list[FaultEvent] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push the messages not dropped, collect the replies, discard the stragglers'."""
        delivered, late = [], []
        for message in messages:
            fault = self._fault(message)
            if fault != "dropout":
                delivered.append(message)
            if fault == "straggler":
                late.append(message)
        replies = list(self._grid.send_and_receive(delivered, timeout=timeout)) if delivered else []
        discarded = {message.metadata.message_id for message in late}
        self._learn_names(replies)
        return [reply for reply in replies if reply.metadata.reply_to_message_id not in discarded]

    def _fault(self, message: Message) -> FaultKind | None:
        server_round = _train_round(message)
        name = self.names.get(message.metadata.dst_node_id)
        if server_round is None or name is None:
            return None
        fault = self.plan.fault(server_round=server_round, institution=name)
        if fault is not None:
            self.events.append(FaultEvent(round=server_round, institution=name, kind=fault))
        return fault

    def _learn_names(self, replies: list[Message]) -> None:
        for reply in replies:
            if reply.metadata.message_type == MessageType.QUERY and not reply.has_error():
                identity = reply.content.config_records.get("identity")
                if identity is not None and "institution" in identity:
                    self.names[reply.metadata.src_node_id] = str(identity["institution"])

    # -- the wrapped grid's own behaviour ------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)


def faults_record(faults: FaultsConfig, events: list[FaultEvent]) -> FaultsRecord:
    """results.json's `faults` (without the clean twin's numbers, added once it has run)."""
    chosen = faults.institutions
    return FaultsRecord(
        dropout=faults.dropout,
        straggler=faults.straggler,
        crash=faults.crash,
        institutions=None if chosen is None else [str(index) for index in sorted(chosen)],
        events=sorted(events, key=lambda event: (event.round, event.institution)),
    )
