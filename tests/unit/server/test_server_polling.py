"""PromptGrid collects replies as they arrive and gives up at the time-out."""

from __future__ import annotations

import time
from types import SimpleNamespace

from confide.server.polling import PromptGrid


class ScriptedGrid:
    """A grid whose replies become available at given times (the SuperLink's side)."""

    def __init__(self, ready_after: dict[str, float]) -> None:
        self.ready_after = ready_after
        self.started = time.monotonic()
        self.pulls = 0

    def push_messages(self, messages):
        return list(messages)

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.started
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
            for i in ids
            if self.ready_after[i] <= now
        ]

    def get_node_ids(self):
        return [1, 2]


def test_replies_are_collected_soon_after_they_arrive():
    inner = ScriptedGrid({"a": 0.0, "b": 0.3})
    started = time.monotonic()
    replies = PromptGrid(inner, interval=0.05).send_and_receive(["a", "b"], timeout=5)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert time.monotonic() - started < 1.0  # Flower's own grid would sleep 3 s here


def test_missing_replies_are_given_up_at_the_timeout():
    inner = ScriptedGrid({"a": 0.0, "b": 60.0})
    started = time.monotonic()
    replies = PromptGrid(inner, interval=0.05).send_and_receive(["a", "b"], timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 0.3 <= time.monotonic() - started < 1.5


def test_everything_else_is_the_wrapped_grids():
    assert PromptGrid(ScriptedGrid({})).get_node_ids() == [1, 2]
