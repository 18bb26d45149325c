"""Prompt reply collection for the ServerApp.

Flower 1.41's deployed grid (`HttpGrid.send_and_receive`) sleeps 3 s between two pulls of
replies, so every message exchange (roster query, training, evaluation) waits up to 3 s after
the last institution answered. `PromptGrid` wraps any grid and polls with a short interval;
everything else is the wrapped grid's own behaviour (push, pull, node list, run).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

POLL_SECONDS = 0.1  # as Flower's in-memory (simulation) grid


class PromptGrid:
    """A grid whose `send_and_receive` polls every `interval` seconds."""

    def __init__(self, grid: Grid, interval: float = POLL_SECONDS) -> None:
        self._grid = grid
        self.interval = interval

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Push `messages`, then collect replies until all arrived or `timeout` passed."""
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            arrived = list(self._grid.pull_messages(waiting))
            replies.extend(arrived)
            waiting.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.interval)
        return replies
