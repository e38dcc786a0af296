"""Stopping a running batch: what :func:`request_stop` sets, and how started rows are settled.

Private to :mod:`prefect_gptimage.flows.batch` (which re-exports :func:`request_stop` and the
rest): split out only to keep that module short. See its module docs, "Stopping".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from prefect.client.schemas.objects import State
from prefect.futures import PrefectFuture
from prefect.states import Failed

from prefect_gptimage.errors import FalError
from prefect_gptimage.prompts import PromptRow
from prefect_gptimage.tasks.intents import read_intent

__all__ = [
    "IN_FLIGHT",
    "NOT_STARTED",
    "STOP_GRACE_S",
    "STOP_SUBMIT_WAIT_S",
    "RowInterrupted",
    "request_stop",
    "reset_stop",
    "stop_requested",
]

#: After a stop, how long (seconds) started rows may take to finish before they are reported as
#: in flight; a row in the middle of its submit is waited for up to :data:`STOP_SUBMIT_WAIT_S`.
STOP_GRACE_S = 4.0
STOP_SUBMIT_WAIT_S = 3.0

#: ``error_type`` of rows a stop left unstarted, and of rows it left running at fal.
NOT_STARTED = "not_started_interrupted"
IN_FLIGHT = "in_flight_interrupted"

stop_event = threading.Event()


def request_stop() -> None:
    """Stop the running batch (see the module docs); safe from a signal handler."""
    stop_event.set()


def stop_requested() -> bool:
    """Whether :func:`request_stop` was called (and not :func:`reset_stop` since)."""
    return stop_event.is_set()


def reset_stop() -> None:
    """Forget a stop (for a process that runs another batch afterwards)."""
    stop_event.clear()


class RowInterrupted(FalError):
    """A row a stop left unstarted (nothing paid) or running at fal (a re-run resumes it)."""


class SettledRow:
    """A row future finished by the flow itself: never started, or abandoned in flight."""

    def __init__(self, error: RowInterrupted) -> None:
        self.state: State[Any] = Failed(data=error, message=error.message)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    def wait(self, timeout: float | None = None) -> None:
        return None


class StartedRow:
    """A started row's future, which a stop can settle before the task finishes."""

    def __init__(self, row: PromptRow, future: PrefectFuture[Any]) -> None:
        self.row, self._future = row, future
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Any], None]] = []
        self._settled: State[Any] | None = None
        self.done = threading.Event()
        future.add_done_callback(lambda _f: self._finish(None))

    def _finish(self, state: State[Any] | None) -> None:
        with self._lock:
            if self.done.is_set():
                return
            self._settled = state
            self.done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def abandon(self) -> None:
        """Report the row as in flight at fal and stop waiting for it (its task runs on)."""
        error = RowInterrupted(
            "in flight (interrupted): submitted to fal and left running there, not cancelled; "
            "a re-run resumes it from the cache without paying again",
            error_type=IN_FLIGHT,
        )
        self._finish(Failed(data=error, message=error.message))

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        with self._lock:
            if not self.done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def wait(self, timeout: float | None = None) -> None:
        self.done.wait(timeout)

    @property
    def state(self) -> State[Any]:
        if self._settled is not None:
            return self._settled
        self._future.wait()  # done already: this only lets the future read its final state
        return self._future.state


def _mid_submit(row: PromptRow) -> bool:
    """Whether this row's submit was sent and its answer is not recorded yet."""
    try:
        intent = read_intent(row.request, row.variant)
    except Exception:  # an unreadable store: assume the worst, within the wait's bound
        return True
    return intent is not None and intent.state == "submitting"


def watch_for_stop(
    started: dict[int, StartedRow], lock: threading.Lock, over: threading.Event
) -> None:
    """On a stop: give started rows their grace, then settle the rest as in flight."""
    while not stop_event.wait(0.2):
        if over.is_set():
            return
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and not over.is_set():
        with lock:
            pending = [r for r in started.values() if not r.done.is_set()]
        if not pending:
            return
        time.sleep(0.1)
    deadline = time.monotonic() + STOP_SUBMIT_WAIT_S
    while not over.is_set():
        with lock:
            pending = [r for r in started.values() if not r.done.is_set()]
        if not pending:
            return
        if time.monotonic() >= deadline or not any(_mid_submit(r.row) for r in pending):
            for r in pending:
                r.abandon()
            return
        time.sleep(0.1)


def forget_row(started: dict[int, StartedRow], lock: threading.Lock, handle: StartedRow) -> None:
    with lock:
        started.pop(id(handle), None)
