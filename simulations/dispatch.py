"""Message dispatch for Flower's simulation engine that does not grow with the node count.

Why this exists. Flower 1.41's simulation engine hands messages to the virtual nodes from one
thread (`flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue`) that, every 0.1 s,
asks the in-memory LinkState `get_message_ins(node_id, limit=1)` for *every* registered node,
and each such call walks *every* stored message and re-validates it
(`InMemoryLinkState._check_stored_messages`). One pass therefore costs nodes x messages
validations: with 10,000 virtual institutions and 100 train messages a pass is a million
checks (seconds of one core, under the GIL the ServerApp and Ray's client share), and the
roster's first round (10,000 query messages) is 10^8. Measured on this machine before this
module (`confide-simulate run synthetic-10000 --rounds 3` under py-spy, 2 CPUs): 225 s for
round 1 and 7-8 s per round after, with that loop the largest part of the driver's samples
(docs/benchmarks.md has the numbers since).

What replaces it. `indexed_dispatch` makes one pass over the stored messages instead of one
per node: validate them once (the same `_check_stored_messages`, which drops expired
messages and those whose nodes left the federation), then give each node the first message
addressed to it that was not delivered yet, and mark it delivered, as `get_message_ins(node,
limit=1)` does. Each pass delivers the same messages as Flower's, so what every ClientApp
receives, and every result, is unchanged; only the order in which one pass queues them
(the order they were stored, instead of node order) and the pause between passes (20 ms
instead of 100 ms) differ, and neither reaches a ClientApp (each trains from its own
message, context and seed).

How it is installed. The engine looks the function up in its module when its run starts,
so `prompt_engine()` swaps the module attribute for the duration of one `run_simulation`
and restores it after (plain Flower benchmarks run the original). It is used only with the
Flower release it was written against (1.41.x) and only on the in-memory LinkState; anything
else runs Flower's own loop unchanged. The nodes' mapping to partitions that the engine
passes this function is also published (`EngineRoster`), so that the coordinator of a
simulation can name its virtual institutions without asking each one (see
confide.simulations.engine).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

from flwr.app import Message

SUPPORTED = "1.41."  # the Flower release whose engine internals this module matches
DISPATCH_SECONDS = 0.02  # pause between two dispatch passes (Flower's: 0.1 s)
NodeMapping = dict[int, int]  # node id -> partition id, as the engine registers them


def supported() -> bool:
    """Whether the installed Flower is the release this module was written against."""
    import flwr

    return str(flwr.__version__).startswith(SUPPORTED)


def undelivered(state: Any, nodes: NodeMapping) -> list[Message]:
    """For each node of `nodes`, the first stored message addressed to it and not yet
    delivered (each marked delivered), after dropping the invalid ones: what one pass of
    Flower's `get_message_ins(node_id, limit=1)` over every node returns, in one pass over
    the messages. `state` is Flower's InMemoryLinkState (its lock and message store)."""
    from flwr.supercore.date import now

    chosen: dict[int, Message] = {}
    with state.lock:
        stored = list(state.message_ins_store)
        if not stored:
            return []
        state._check_stored_messages(set(stored))  # drops expired and orphaned messages
        for message_id in stored:
            message = state.message_ins_store.get(message_id)
            if message is None:
                continue
            metadata = message.metadata
            node = metadata.dst_node_id
            if metadata.delivered_at == "" and node in nodes and node not in chosen:
                chosen[node] = message
        delivered_at = now().isoformat()
        for message in chosen.values():
            message.metadata.delivered_at = delivered_at
    return list(chosen.values())


class EngineRoster:
    """The engine's node id -> partition id mapping of the simulation in progress, for the
    coordinator's roster: published when the engine starts dispatching, read by the
    ServerApp (which starts before it; `names` waits up to `timeout` seconds, the job's
    round timeout, as a query to every node would)."""

    def __init__(self, timeout: float = 600.0) -> None:
        self.timeout = timeout
        self._names: dict[int, str] | None = None
        self._ready = threading.Event()

    def publish(self, nodes: NodeMapping) -> None:
        self._names = {node: str(partition) for node, partition in nodes.items()}
        self._ready.set()

    def names(self) -> dict[int, str]:
        """node id -> institution name (a virtual institution is named by its partition id,
        as its ClientApp answers the roster's query: confide.client.data)."""
        if not self._ready.wait(self.timeout) or self._names is None:
            raise RuntimeError("the simulation engine did not start dispatching messages")
        return self._names


def indexed_dispatch(
    roster: EngineRoster | None = None, interval: float = DISPATCH_SECONDS
) -> Callable[[Any, Queue[Message], NodeMapping, threading.Event], None]:
    """A drop-in for Flower's `add_messages_to_queue(state, queue, nodes_mapping, f_stop)`
    that dispatches with `undelivered` every `interval` seconds (Flower's own loop for a
    LinkState other than the in-memory one), publishing the mapping to `roster`."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    original = vce_api.add_messages_to_queue

    def dispatch(
        state: Any, queue: Queue[Message], nodes: NodeMapping, f_stop: threading.Event
    ) -> None:
        if roster is not None:
            roster.publish(nodes)
        if not isinstance(state, InMemoryLinkState):
            original(state, queue, nodes, f_stop)
            return
        while not f_stop.is_set():
            for message in undelivered(state, nodes):
                queue.put(message)
            f_stop.wait(interval)

    return dispatch


@contextmanager
def prompt_engine(roster: EngineRoster | None = None) -> Iterator[bool]:
    """Within the block, Flower's simulation engine dispatches with `indexed_dispatch`;
    yields whether it does (False: another Flower release, whose own loop then runs)."""
    if not supported():
        yield False
        return
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = indexed_dispatch(roster)  # type: ignore[assignment]
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original
