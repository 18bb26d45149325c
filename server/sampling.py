"""Who the institutions are, and which of them each round asks, reproducibly from the seed.

Flower's FedAvg samples node ids with the global `random` module, and simulated node ids are
random, so the same seed would pick different institutions on every run. The roster names
every node first, then samples institutions by name with a generator seeded by (job seed,
kind, round) over the roster sorted by name: the same seed asks the same institutions.

Who a node is comes from one of two places. In deployment, from the coordinator's own record
of the key each institution registered at enrollment (`registered`: node id -> name, revoked
institutions left out): a node cannot choose its name, and a node that is not an enrolled
institution is never sampled. In simulation every node runs confide's own ClientApp on
partitions the coordinator made: the engine's own node -> partition mapping names them
(`registered` again; confide.simulations.dispatch), or, where that is not at hand (a
simulation with injected faults, `flwr run` without a coordinator), each node is asked (a
`query` message).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from logging import INFO, WARNING
from typing import Literal

from flwr.app import Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from confide.common.errors import JobStopped, TooFewInstitutions
from confide.common.seeding import derive_seed
from confide.server.history import JobHistory
from confide.server.job import FederationConfig

Kind = Literal["train", "evaluate"]


class Roster:
    """Node id -> institution, the institutions that sit out the rest of the job, and the
    seeded sample of each round.

    `registered` (deployment): the enrolled institutions' node ids and names, read again
    every round so that revocations and key rotations take effect; None (simulation): nodes
    are asked who they are. Every institution named is listed in `history` (its results row
    exists even if it is never sampled).
    """

    def __init__(
        self,
        federation: FederationConfig,
        seed: int,
        history: JobHistory,
        *,
        registered: Callable[[], dict[int, str]] | None = None,
    ) -> None:
        self.federation = federation
        self.seed = seed
        self.history = history
        self.registered = registered
        self.names: dict[int, str] = {}  # node id -> institution
        self.strangers: set[int] = set()  # live nodes that are no enrolled institution
        # Institutions that refused for the whole job: name -> what refused it, and those of
        # them that refuse evaluation too.
        self.refusing: dict[str, str] = {}
        self.unevaluated: set[str] = set()

    def name(self, node: int) -> str:
        """The institution at `node` (its id as text if it was never named)."""
        return self.names.get(node, str(node))

    def exclude(self, institution: str, why: str, *, evaluation: bool) -> None:
        """`institution` trains no more in this job (`why`: what refused), nor evaluates if
        `evaluation`."""
        self.refusing[institution] = why
        if evaluation:
            self.unevaluated.add(institution)

    def sample(self, grid: Grid, server_round: int, kind: Kind) -> list[int]:
        """Node ids of a reproducible sample: seeded by (job seed, kind, round), over the
        roster sorted by institution name, so node ids (random in simulation) do not matter.
        JobStopped when institutions refused for the job and too few are left to train."""
        if kind == "train":
            fraction, minimum = self.federation.fraction_train, self.federation.min_train
        else:
            fraction, minimum = self.federation.fraction_evaluate, self.federation.min_evaluate
        self._refresh(grid)
        live = set(self._institution_nodes(grid))
        candidates = sorted(
            (name, node)
            for node, name in self.names.items()
            if node in live and not self._excluded(name, kind)
        )
        if kind == "train" and len(candidates) < minimum and self.refusing:
            refused = ", ".join(f"{name} ({why})" for name, why in sorted(self.refusing.items()))
            raise JobStopped(
                f"stopped before round {server_round}: {len(candidates)} institution(s) can "
                f"still train, federation.min_train is {minimum}; refused by the "
                f"institutions: {refused}"
            )
        size = min(len(candidates), max(minimum, int(len(candidates) * fraction)))
        rng = random.Random(derive_seed(self.seed, kind, server_round))
        return [node for _, node in sorted(rng.sample(candidates, size))]

    def _excluded(self, name: str, kind: Kind) -> bool:
        if kind == "train":
            return name in self.refusing
        return name in self.unevaluated

    def _refresh(self, grid: Grid) -> None:
        """Wait for `min_available` institutions, then name the nodes not yet named."""
        needed = self.federation.min_available
        deadline = time.monotonic() + self.federation.timeout
        while len(nodes := self._institution_nodes(grid)) < needed:
            if time.monotonic() > deadline:
                raise TooFewInstitutions(
                    f"only {len(nodes)} of the {needed} institutions the job "
                    f"needs (federation.min_available) were connected after "
                    f"{self.federation.timeout:.0f}s"
                )
            time.sleep(1.0)
        if self.registered is None:
            self._ask_names(grid, nodes)

    def _institution_nodes(self, grid: Grid) -> list[int]:
        """Live nodes that are institutions: in deployment the enrolled ones (named from the
        coordinator's records), in simulation all of them."""
        live = list(grid.get_node_ids())
        if self.registered is None:
            return live
        enrolled = self.registered()
        online = set(live)  # a set: a simulation names 10,000 nodes this way every round
        for node in online - set(enrolled) - self.strangers:
            self.strangers.add(node)
            log(WARNING, "node %d is not an enrolled institution; it is never sampled", node)
        self.names = {node: name for node, name in enrolled.items() if node in online}
        for name in self.names.values():
            self.history.spend(name)  # listed in the results even if never sampled
        return list(self.names)

    def _ask_names(self, grid: Grid, nodes: list[int]) -> None:
        """Simulation: ask the nodes not yet named who they are (a `query` message)."""
        unknown = [node for node in nodes if node not in self.names]
        if not unknown:
            return
        queries = [
            Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=node)
            for node in unknown
        ]
        for reply in grid.send_and_receive(queries, timeout=self.federation.timeout):
            if reply.has_error():
                log(
                    WARNING,
                    "node %d did not identify itself: %s",
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            name = str(reply.content["identity"]["institution"])
            self.names[reply.metadata.src_node_id] = name
            self.history.spend(name)  # listed in the results even if never sampled
        log(INFO, "roster: %d institutions", len(self.names))
