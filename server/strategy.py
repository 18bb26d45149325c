"""FedAvg with a deterministic roster, update validation, privacy bookkeeping and optional
central (institution-level) DP.

Flower's FedAvg samples node ids with the global `random` module, and simulated node ids are
random, so the same seed would pick different institutions on every run. This strategy names
every node first, then samples institutions by name with a generator seeded by (job seed,
round). Replies are aggregated in institution order, so the floating-point sum is the same on
every run too.

Who a node is comes from one of two places. In deployment, from the coordinator's own record
of the key each institution registered at enrollment (`registered`: node id -> name, revoked
institutions left out): a node cannot choose its name, and a node that is not an enrolled
institution is never sampled. In simulation every node runs confide's own ClientApp on
partitions the coordinator made, so each is asked (a `query` message).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from confide.common.errors import JobStopped, TooFewInstitutions, UpdateRejected
from confide.common.seeding import derive_seed
from confide.privacy import instructions as keys
from confide.privacy.policy import APP_REFUSED, REFUSED_BY_POLICY
from confide.server.central_dp import CentralDP
from confide.server.history import JobHistory
from confide.server.job import FederationConfig

# Refusals an institution repeats for every later round of the same job: its spend only
# grows and the job's sigma is fixed (its limits); the job's app does not change (app check).
FINAL_REFUSALS = {REFUSED_BY_POLICY: "its privacy limits", APP_REFUSED: "its app check"}


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


class ConfideFedAvg(FedAvg):
    """Weighted FedAvg over validated updates, sampling institutions reproducibly."""

    def __init__(
        self,
        federation: FederationConfig,
        seed: int,
        history: JobHistory,
        central: CentralDP | None = None,
        *,
        registered: Callable[[], dict[int, str]] | None = None,
    ) -> None:
        """`registered` (deployment): the enrolled institutions' node ids and names, read
        again every round so that revocations and key rotations take effect; None
        (simulation): nodes are asked who they are."""
        super().__init__(
            fraction_train=federation.fraction_train,
            fraction_evaluate=federation.fraction_evaluate,
            min_train_nodes=federation.min_train,
            min_evaluate_nodes=federation.min_evaluate,
            min_available_nodes=federation.min_available,
        )
        self.federation = federation
        self.seed = seed
        self.history = history
        self.central = central
        self.registered = registered
        self.strangers: set[int] = set()  # live nodes that are no enrolled institution
        self.asked = 0  # institutions sent this round's train message
        self.roster: dict[int, str] = {}  # node id -> institution
        # Institutions that refused a round for a reason that holds for the whole job
        # (FINAL_REFUSALS): name -> what refused it.
        self.refusing: dict[str, str] = {}
        self.global_arrays: ArrayRecord | None = None
        self.round_started = time.perf_counter()
        self.last_trained = 0
        self.last_epsilons: dict[str, float] = {}
        self.last_evaluate_metrics: dict[str, float] = {}

    # -- roster and sampling -------------------------------------------------------------
    def _refresh_roster(self, grid: Grid) -> None:
        """Wait for `min_available` institutions, then name the nodes not yet named."""
        deadline = time.monotonic() + self.federation.timeout
        while len(nodes := self._institution_nodes(grid)) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise TooFewInstitutions(
                    f"only {len(nodes)} of the {self.min_available_nodes} institutions the job "
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
        for node in set(live) - set(enrolled) - self.strangers:
            self.strangers.add(node)
            log(WARNING, "node %d is not an enrolled institution; it is never sampled", node)
        self.roster = {node: name for node, name in enrolled.items() if node in live}
        for name in self.roster.values():
            self.history.spend(name)  # listed in the results even if never sampled
        return list(self.roster)

    def _ask_names(self, grid: Grid, nodes: list[int]) -> None:
        """Simulation: ask the nodes not yet named who they are (a `query` message)."""
        unknown = [node for node in nodes if node not in self.roster]
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
            self.roster[reply.metadata.src_node_id] = name
            self.history.spend(name)  # listed in the results even if never sampled
        log(INFO, "roster: %d institutions", len(self.roster))

    def _sample(
        self, grid: Grid, server_round: int, fraction: float, minimum: int, kind: str
    ) -> list[int]:
        """Node ids of a reproducible sample: seeded by (job seed, kind, round), over the
        roster sorted by institution name, so node ids (random in simulation) do not matter."""
        self._refresh_roster(grid)
        live = set(self._institution_nodes(grid))
        candidates = sorted(
            (name, node)
            for node, name in self.roster.items()
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

    def _excluded(self, name: str, kind: str) -> bool:
        """Whether `name` sits out `kind` rounds: it refused training for the whole job, or
        refused the job's app (then it refuses evaluation too)."""
        why = self.refusing.get(name)
        return why is not None and (kind == "train" or why == FINAL_REFUSALS[APP_REFUSED])

    def _messages(
        self,
        nodes: list[int],
        arrays: ArrayRecord,
        config: ConfigRecord,
        message_type: str,
        server_round: int,
    ) -> list[Message]:
        config["server-round"] = server_round
        record = RecordDict({"arrays": arrays, "config": config})
        return self._construct_messages(record, nodes, message_type)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.round_started = time.perf_counter()
        self.global_arrays = arrays
        nodes = self._sample(grid, server_round, self.fraction_train, self.min_train_nodes, "train")
        if self.central is not None and (reason := self.central.over_budget(len(nodes))):
            raise JobStopped(f"stopped before round {server_round}: {reason}")
        self.asked = len(nodes)
        log(INFO, "round %d: training on %d institutions", server_round, len(nodes))
        return self._messages(nodes, arrays, config, MessageType.TRAIN, server_round)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(
            grid, server_round, self.fraction_evaluate, self.min_evaluate_nodes, "evaluate"
        )
        return self._messages(nodes, arrays, config, MessageType.EVALUATE, server_round)

    # -- aggregation ---------------------------------------------------------------------
    def _reject(
        self, institution: str, server_round: int, phase: str, reason: str, *, by: str
    ) -> None:
        """Record a reply that did not count: refused by the institution (its error reply)
        or by the coordinator (an update or metrics it could not use)."""
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

    def _ordered(
        self, replies: Iterable[Message], server_round: int, phase: str
    ) -> list[tuple[str, Message]]:
        """Replies without errors, in institution order; errors are recorded and dropped."""
        named = []
        for reply in replies:
            institution = self.roster.get(
                reply.metadata.src_node_id, str(reply.metadata.src_node_id)
            )
            if reply.has_error():
                self._reject(institution, server_round, phase, reply.error.reason, by="institution")
                if reply.error.code in FINAL_REFUSALS:
                    self.refusing[institution] = FINAL_REFUSALS[reply.error.code]
            else:
                named.append((institution, reply))
        return sorted(named, key=lambda item: item[0])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[RecordDict] = []
        self.last_epsilons = {}
        for institution, reply in self._ordered(replies, server_round, "train"):
            try:
                metrics = reply.content["metrics"]
                # Privacy was spent whether or not the update is usable: record it first.
                self._record_spend(institution, metrics, reply.content)
                if int(metrics["num-examples"]) < 1:
                    raise UpdateRejected("num-examples must be at least 1")
                assert self.global_arrays is not None
                check_update(self.global_arrays, reply.content["arrays"])
            except (UpdateRejected, KeyError, TypeError, ValueError) as error:
                reason = f"{type(error).__name__}: {error}"
                self._reject(institution, server_round, "train", reason, by="coordinator")
                continue
            accepted.append(reply.content)
            self.last_epsilons[institution] = self.history.spend(institution).epsilon
        self.last_trained = len(accepted)
        assert self.global_arrays is not None
        if self.central is not None:
            # Released with noise even when nobody's update was accepted: an unchanged model
            # would tell observers exactly that (e.g. that the one possible contributor refused).
            updates = [content["arrays"] for content in accepted]
            arrays = self.central.aggregate(self.global_arrays, updates, self.asked, server_round)
            self.history.central_releases = list(self.central.releases)
        elif accepted:
            arrays = aggregate_arrayrecords(accepted, self.weighted_by_key)
        else:
            log(WARNING, "round %d: no valid update; the global model is unchanged", server_round)
            return None, None
        examples = sum(int(content["metrics"]["num-examples"]) for content in accepted)
        if not accepted:
            return arrays, MetricRecord({"institutions": 0, "num-examples": 0})
        metrics = MetricRecord(
            {
                "institutions": len(accepted),
                "num-examples": examples,
                "epsilon-max": self.history.epsilon_max,
            }
        )
        return arrays, metrics

    def _record_spend(self, institution: str, metrics: MetricRecord, content: RecordDict) -> None:
        """Update the institution's cumulative spend from its reply (KeyError if incomplete)."""
        spend = self.history.spend(institution)
        if keys.MECHANISM in content:
            mechanism = content[keys.MECHANISM]
            spend.noise_generator = str(mechanism.get(keys.NOISE_GENERATOR, "")) or None
            spend.dataset_accountant = str(mechanism.get(keys.DATASET_ACCOUNTANT, "")) or None
        if int(metrics[keys.DP_ENABLED]):
            reported = float(metrics[keys.EPSILON])
            if reported < spend.epsilon:
                # Cumulative epsilon never goes down; an institution that lost its history
                # (or misreports) must not lower what this job records.
                log(
                    WARNING,
                    "%s reported epsilon %.3f, below the %.3f it reported before; keeping %.3f",
                    institution,
                    reported,
                    spend.epsilon,
                    spend.epsilon,
                )
            spend.epsilon = max(spend.epsilon, reported)
            spend.noise_multiplier = float(metrics[keys.NOISE_MULTIPLIER])
            spend.sample_rate = float(metrics[keys.SAMPLE_RATE])
            spend.steps = int(metrics[keys.TOTAL_STEPS])
        else:
            spend.steps += int(metrics[keys.STEPS])
        spend.rounds_trained += 1
        spend.declared_examples = int(metrics["num-examples"])
        if keys.DATASET_EPSILON in metrics:
            spend.dataset_epsilon = max(
                spend.dataset_epsilon or 0.0, float(metrics[keys.DATASET_EPSILON])
            )
            spend.dataset_delta = float(metrics[keys.DATASET_DELTA])

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the institutions' validation metrics."""
        totals: dict[str, float] = {}
        weight = 0
        for institution, reply in self._ordered(replies, server_round, "evaluate"):
            try:
                metrics = {key: float(value) for key, value in reply.content["metrics"].items()}
                examples = int(metrics.pop("num-examples"))
            except (KeyError, TypeError, ValueError) as error:
                reason = f"{type(error).__name__}: {error}"
                self._reject(institution, server_round, "evaluate", reason, by="coordinator")
                continue
            self.history.spend(institution).validation_examples = examples
            if examples <= 0:
                continue
            weight += examples
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + examples * value
        if weight == 0:
            self.last_evaluate_metrics = {}
            return None
        self.last_evaluate_metrics = {key: value / weight for key, value in totals.items()}
        return MetricRecord(self.last_evaluate_metrics | {"num-examples": weight})
