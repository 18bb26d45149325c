"""The SuperNode `confide-client start` runs pulls and pushes promptly (`prompt_pulls`)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from flwr.supernode import start_client_internal as loop

from confide.client import flower_supernode
from confide.client.flower_supernode import PULL_SECONDS, REPLY_SECONDS, prompt_pulls


@pytest.fixture
def slept() -> Iterator[list[float]]:
    """prompt_pulls applied to this process's Flower (undone afterwards); the pauses it then
    sleeps, recorded instead of slept."""
    original = loop.time
    asked: list[float] = []
    prompt_pulls(sleeper=asked.append)
    try:
        yield asked
    finally:
        loop.time = original


def test_flowers_idle_and_reply_pauses_become_the_short_ones(slept: list[float]) -> None:
    loop.time.sleep(3)  # after a pull that brought nothing
    loop.time.sleep(0.5)  # waiting for the ClientApp's reply
    loop.time.sleep(0.05)  # any other pause

    assert slept == [PULL_SECONDS, REPLY_SECONDS, 0.05]


def test_an_idle_node_pulls_every_three_seconds_again(
    slept: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    loop.time.sleep(3)
    monkeypatch.setattr(flower_supernode, "IDLE_SECONDS", 0.0)  # idle long enough
    loop.time.sleep(3)
    monkeypatch.setattr(flower_supernode, "IDLE_SECONDS", 60.0)
    loop.time.sleep(0.5)  # a message is handled: prompt again
    loop.time.sleep(3)

    assert slept == [PULL_SECONDS, 3, REPLY_SECONDS, PULL_SECONDS]


def test_clock_functions_are_the_time_modules(slept: list[float]) -> None:
    assert loop.time.time is time.time
    assert loop.time.monotonic is time.monotonic


def test_a_flower_loop_that_no_longer_uses_time_is_refused(slept: list[float]) -> None:
    with pytest.raises(RuntimeError, match="no longer sleeps with `time`"):
        prompt_pulls()  # its `time` is the stand-in now
