"""An in-process Flower grid: confide's real ServerApp logic and real ClientApps, one process.

Only Flower's transport is replaced (the integration tests run it for real, on Ray and on a
TLS SuperLink); every message goes through the ClientApp exactly as Flower would call it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from uuid import uuid4

import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp import Grid

from confide.client.app import build_client_app
from confide.client.data import SimulatedInstitutions
from confide.privacy.policy import PrivacyPolicy
from confide.tasks.config import DataConfig, TaskConfig


class InProcessGrid(Grid):
    """Node i runs `app` with a Context that keeps its state between messages of a run.

    As Flower's grids do, every message gets an id when it is sent. Nodes in `silent` never
    answer (their replies are missing, as after a round's timeout); nodes in `offline` are
    answered for by the SuperLink, with the error Flower's SuperLink builds for a node that
    stopped reporting heartbeats (sent from the SuperLink's own node id). Both answer the
    roster's `query` (who they are) as usual."""

    def __init__(self, app: ClientApp, nodes: int, run_id: int = 1) -> None:
        self.app = app
        self.silent: set[int] = set()
        self.offline: set[int] = set()
        self.contexts = {
            100 + i: Context(
                run_id=run_id,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(nodes)
        }

    def set_run(self, run):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do
            node = message.metadata.dst_node_id
            if message.metadata.message_type == MessageType.QUERY:  # who it is: always answered
                replies.append(self.app(message, self.contexts[node]))
                continue
            if node in self.silent:
                continue
            if node in self.offline:
                replies.append(
                    create_message_error_unavailable_res_message(message.metadata, "node_unavail")
                )
                continue
            replies.append(self.app(message, self.contexts[node]))
        return replies


@pytest.fixture
def federation(tmp_path: Path):
    """(grid, source) for `institutions` virtual digits institutions with ledgers in
    tmp_path/`state` and an optional policy."""

    def make(
        institutions: int = 3,
        policy: PrivacyPolicy | None = None,
        run_id: int = 1,
        state: str = "state",
    ) -> tuple[InProcessGrid, SimulatedInstitutions]:
        source = SimulatedInstitutions(
            TaskConfig(name="digits"),
            DataConfig(test_fraction=0.2, validation_fraction=0.1),
            institutions,
            seed=0,
            state=tmp_path / state,
            policy=policy,
        )
        app = build_client_app(source, noise_seed=0)
        return InProcessGrid(app, institutions, run_id), source

    return make


@pytest.fixture
def state_dir(tmp_path: Path):  # type: ignore[no-untyped-def]
    """An empty coordinator state directory: default settings, nothing else yet."""
    from confide.server.settings import ServerSettings, StateDir

    state = StateDir(tmp_path / "state")
    state.root.mkdir()
    state.save_settings(ServerSettings())
    return state
