"""A slow question's last answer, asked again in the background: readers never wait for it.

Why: some figures cost a process each (`flwr supernode list`, `flwr ls`: seconds of CPU, up to
their timeout when the SuperLink is busy). Whoever reads them on a request (a Prometheus
scrape, a dashboard's poll) must answer at once, with the last answer and how old it is,
rather than time out waiting for a new one. So `Refreshed.latest()` returns what is known now
and, when that is older than its interval and no question is in flight, asks again in a
daemon thread. `close()` asks nothing more; a question in flight ends by its own timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Answer(Generic[T]):
    """What is known now. `value`: the last answer, None when the last question failed (a
    stale answer is never shown as current) or none was answered yet; `answered_at`: when the
    last answer came (time.monotonic), None if none ever did; `problem`: why the last question
    failed."""

    value: T | None
    answered_at: float | None
    problem: str | None = None

    def age(self, now: float | None = None) -> float | None:
        """Seconds since the last answer came; None if none ever did."""
        if self.answered_at is None:
            return None
        return (time.monotonic() if now is None else now) - self.answered_at


class Refreshed(Generic[T]):
    """`ask`'s answer, asked again in a daemon thread (`name`) once older than `interval`
    seconds when read; an exception of `expected` (what `ask` raises when its source does
    not answer) makes the answer None with its message as `problem`, anything else too,
    named by its type, so that the thread never dies silently with a stale answer kept."""

    def __init__(
        self,
        ask: Callable[[], T],
        interval: float,
        *,
        name: str,
        expected: tuple[type[BaseException], ...] = (OSError,),
    ) -> None:
        self._ask = ask
        self.interval = interval
        self._name = name
        self._expected = expected
        self._lock = threading.Lock()
        self._answer: Answer[T] = Answer(None, None)
        self._asked_at = float("-inf")  # when the last question ended (monotonic)
        self._thread: threading.Thread | None = None
        self._closed = False

    def latest(self) -> Answer[T]:
        """What is known now; asks again in the background if that is due."""
        with self._lock:
            due = (
                not self._closed
                and (self._thread is None or not self._thread.is_alive())
                and time.monotonic() - self._asked_at >= self.interval
            )
            if due:
                self._thread = threading.Thread(target=self.refresh, daemon=True, name=self._name)
                self._thread.start()
            return self._answer

    def refresh(self) -> Answer[T]:
        """Ask now, on this thread, and keep the answer (the background thread's work; a caller
        that must have a current answer may call it itself)."""
        try:
            value = self._ask()
        except self._expected as error:
            answer: Answer[T] = Answer(None, self._answer.answered_at, str(error))
        except Exception as error:  # kept as the problem, not lost with the thread
            answer = Answer(None, self._answer.answered_at, f"{type(error).__name__}: {error}")
        else:
            answer = Answer(value, time.monotonic())
        with self._lock:
            self._answer, self._asked_at = answer, time.monotonic()
        return answer

    def wait(self, timeout: float | None = None) -> None:
        """Until the question in flight, if any, has its answer (or `timeout` seconds)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def close(self) -> None:
        """Ask nothing more (a question in flight ends by its own timeout, its thread a
        daemon)."""
        with self._lock:
            self._closed = True
