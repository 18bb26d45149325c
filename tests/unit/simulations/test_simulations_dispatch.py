"""confide's dispatch for Flower's simulation engine hands out what Flower's own loop does."""

from __future__ import annotations

import threading
import time
from queue import Queue

import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from confide.simulations.dispatch import (
    EngineRoster,
    indexed_dispatch,
    prompt_engine,
    supported,
    undelivered,
)

pytestmark = pytest.mark.skipif(not supported(), reason="written against Flower 1.41")


@pytest.fixture(autouse=True)
def _task_identity_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_engine` sets the process's task identity (Flower reads a message's run from it):
    each test's is undone, so later tests do not inherit run 7."""
    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name))


def _engine(nodes: int):
    """A LinkState with `nodes` registered nodes and a run, as run_simulation sets them up,
    and the grid the ServerApp pushes messages with."""
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    mapping = vce_api._register_nodes(num_nodes=nodes, state_factory=factory)
    run = Run.create_empty(run_id=7)
    run.primary_task_id = 11
    run.federation_id = NOOP_FEDERATION_ID
    state = factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[11] = Task(task_id=11, run_id=run.run_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, SUPERLINK_NODE_ID
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, mapping, grid


def _push(grid: InMemoryGrid, nodes: list[int]) -> list[str]:
    messages = [Message(RecordDict(), message_type="query", dst_node_id=node) for node in nodes]
    return list(grid.push_messages(messages))


def test_one_pass_delivers_what_flowers_per_node_loop_delivers():
    state, mapping, grid = _engine(6)
    nodes = list(mapping)
    twin_state, twin_mapping, twin_grid = _engine(6)
    twin_nodes = list(twin_mapping)
    targets = [0, 2, 2, 5, 0, 3]  # two messages for nodes 0 and 2
    _push(grid, [nodes[i] for i in targets])
    _push(twin_grid, [twin_nodes[i] for i in targets])
    for _ in range(3):  # pass after pass, until nothing is left
        ours = undelivered(state, mapping)
        flowers = [
            message
            for node in twin_mapping
            for message in twin_state.get_message_ins(node_id=node, limit=1)
        ]
        assert sorted(mapping[m.metadata.dst_node_id] for m in ours) == sorted(
            twin_mapping[m.metadata.dst_node_id] for m in flowers
        )
        assert all(m.metadata.delivered_at for m in ours)
    assert undelivered(state, mapping) == []


def test_expired_messages_are_dropped_as_flowers_loop_drops_them():
    state, mapping, grid = _engine(3)
    twin_state, twin_mapping, twin_grid = _engine(3)
    for engine_grid, engine_mapping in ((grid, mapping), (twin_grid, twin_mapping)):
        nodes = list(engine_mapping)
        short = Message(RecordDict(), message_type="query", dst_node_id=nodes[0], ttl=0.2)
        kept = Message(RecordDict(), message_type="query", dst_node_id=nodes[1])
        engine_grid.push_messages([short, kept])
    time.sleep(0.4)  # past the first message's time to live
    ours = undelivered(state, mapping)
    flowers = [
        m for node in twin_mapping for m in twin_state.get_message_ins(node_id=node, limit=1)
    ]
    assert [mapping[m.metadata.dst_node_id] for m in ours] == [1]
    assert [twin_mapping[m.metadata.dst_node_id] for m in flowers] == [1]


def test_each_node_gets_its_first_message_first_and_unknown_nodes_none():
    state, mapping, grid = _engine(3)
    first, second = list(mapping)[:2]
    ids = _push(grid, [first, first, second])
    got = undelivered(state, {first: 0})  # `second` is not the engine's
    assert [m.metadata.message_id for m in got] == [ids[0]]
    assert [m.metadata.message_id for m in undelivered(state, mapping)] == [ids[1], ids[2]]


def test_the_dispatch_loop_queues_messages_and_publishes_the_mapping():
    state, mapping, grid = _engine(4)
    roster = EngineRoster(timeout=5)
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    loop = threading.Thread(
        target=indexed_dispatch(roster, interval=0.01), args=(state, queue, mapping, stop)
    )
    loop.start()
    try:
        assert roster.names() == {node: str(i) for node, i in mapping.items()}
        ids = _push(grid, list(mapping))
        got = {queue.get(timeout=5).metadata.message_id for _ in ids}
        assert got == set(ids)
    finally:
        stop.set()
        loop.join()


def test_the_engine_is_flowers_own_again_after_the_block():
    original = vce_api.add_messages_to_queue
    with prompt_engine() as active:
        assert active and vce_api.add_messages_to_queue is not original
    assert vce_api.add_messages_to_queue is original


def test_a_roster_nobody_published_refuses_to_name_the_nodes():
    with pytest.raises(RuntimeError, match="did not start"):
        EngineRoster(timeout=0.01).names()
