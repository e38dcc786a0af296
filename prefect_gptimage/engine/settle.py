"""Rows on a stop: the ones not started are settled at once, the ones in flight after a grace.

After :meth:`Stop.request <prefect_gptimage.engine.stop.Stop.request>` the engine starts no new
row; each is reported "not started (interrupted)" (:data:`NOT_STARTED`, nothing paid). Rows
already started get :attr:`Stop.grace` seconds to finish; those still waiting on fal then are
reported "in flight (interrupted)" (:data:`IN_FLIGHT`) once their submit has been recorded
(never in the middle of one: that waits up to :data:`STOP_SUBMIT_WAIT_S` more), and left
running at fal: nothing is cancelled, and a re-run resumes them from the cache without paying
again. A started row whose submit was never sent (it waited for a fal slot) is reported "not
started": its generate path checks the stop before submitting (``GenerationOptions.stop``),
so it never will. :class:`StartedRow` is the future the engine waits on, which
:class:`StartedRows` (the run's watcher) can settle before the row's task run ends.

On a cancel through Prefect (:attr:`Stop.cancelled <prefect_gptimage.engine.stop.Stop.cancelled>`)
the watcher also asks fal, at once and again when the grace ends, about each started row whose
submit is recorded: a request still waiting in fal's queue is cancelled there (it cost nothing)
and its row reported "cancelled at fal while queued" (:data:`CANCELLED_QUEUED`, nothing paid; a
re-run submits it). Requests already running are left to the grace, then reported in flight.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any

from prefect.client.schemas.objects import State
from prefect.futures import PrefectFuture
from prefect.states import Failed

from prefect_gptimage.engine.stop import Stop
from prefect_gptimage.errors import GptImageError, PaidRequestFailed
from prefect_gptimage.prompts import PromptRow
from prefect_gptimage.tasks.generate import IN_FLIGHT, NOT_STARTED, RowInterrupted, not_started
from prefect_gptimage.tasks.intents import read_intent, submit_state

__all__ = [
    "CANCELLED_QUEUED",
    "IN_FLIGHT",
    "NOT_STARTED",
    "STOP_SUBMIT_WAIT_S",
    "RowInterrupted",
    "SettledRow",
    "StartedRow",
    "StartedRows",
    "not_started",
]

#: A row in the middle of its submit when the grace ends is waited for this long (seconds).
STOP_SUBMIT_WAIT_S = 3.0
#: During the grace of a cancel, fal is asked this often (seconds) about rows newly submitted.
CANCEL_SWEEP_S = 1.0
#: ``error_type`` of a row whose request a cancel removed from fal's queue: nothing was paid.
CANCELLED_QUEUED = "cancelled_queued"

#: Cancels a row's request at fal if it is still queued there: its request id if it did.
CancelQueued = Callable[[PromptRow], str | None]


class SettledRow:
    """A row future finished by the engine itself: never started."""

    def __init__(self, error: RowInterrupted) -> None:
        self.state: State[Any] = Failed(data=error, message=error.message)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    def wait(self, timeout: float | None = None) -> None:
        return None


class StartedRow:
    """A started row's future, which a stop can settle before its task run finishes."""

    def __init__(self, row: PromptRow, future: PrefectFuture[Any]) -> None:
        self.row, self._future = row, future
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Any], None]] = []
        self._settled: State[Any] | None = None
        self._claimed = False  # the watcher is settling it: the task run's end waits
        self._task_ended = False
        self.done = threading.Event()
        future.add_done_callback(lambda _f: self._ended())

    def _ended(self) -> None:
        with self._lock:
            self._task_ended = True
            if self._claimed:
                return
        self._finish(None)

    def claim(self) -> bool:
        """Take over settling the row while the watcher asks fal about it (the task run's end
        is then held back until :meth:`release`); False if the row is done already."""
        with self._lock:
            if self.done.is_set():
                return False
            self._claimed = True
            return True

    def release(self) -> None:
        """Give settling back to the task run (it is finished now if it ended meanwhile)."""
        with self._lock:
            self._claimed = False
            ended = self._task_ended
        if ended:
            self._finish(None)

    def cancelled_at_fal(self, request_id: str) -> None:
        """Settle a claimed row whose request a cancel removed from fal's queue."""
        error = RowInterrupted(
            f"cancelled at fal while queued ({request_id}): the flow run was cancelled before "
            "the request ran, so nothing was paid; a re-run submits it",
            error_type=CANCELLED_QUEUED,
            request_id=request_id,
        )
        self._finish(Failed(data=error, message=error.message))

    def _finish(self, state: State[Any] | None) -> None:
        with self._lock:
            if self.done.is_set():
                return
            self._settled = state
            self.done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def abandon(self, submitted: bool = True) -> None:
        """Stop waiting for the row (its task runs on): reported as in flight at fal (paid, with
        its request id when its submit is recorded), or, when its submit was never sent (it
        waited for a fal slot), as not started: it will not be (its generate path checks the
        stop before submitting)."""
        error: GptImageError = not_started("it waited for a fal slot; nothing was submitted for it")
        if submitted:
            error = RowInterrupted(
                "in flight (interrupted): submitted to fal and left running there, not "
                "cancelled; a re-run resumes it from the cache without paying again",
                error_type=IN_FLIGHT,
            )
            intent = read_intent(self.row.request, self.row.variant)
            if intent is not None and intent.handle is not None:
                error = PaidRequestFailed(error, intent.handle.request_id, paid=True)
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


class StartedRows:
    """The rows of one run started and not finished, and the thread that settles them on a stop.

    Used as a context manager around the run: the watcher runs inside it and ends with it.
    """

    def __init__(self, stop: Stop, cancel_queued: CancelQueued | None = None) -> None:
        self.stop = stop
        self._cancel_queued = cancel_queued
        self._rows: dict[int, StartedRow] = {}
        self._lock = threading.Lock()
        self._over = threading.Event()
        self._watcher = threading.Thread(
            # in the flow's context: its settings say where the submit intents are read
            target=contextvars.copy_context().run,
            args=(self._watch,),
            name="gptimage-stop-watcher",
            daemon=True,
        )

    def add(self, handle: StartedRow) -> StartedRow:
        with self._lock:
            self._rows[id(handle)] = handle
        handle.add_done_callback(self._forget)
        return handle

    def _forget(self, handle: StartedRow) -> None:
        with self._lock:
            self._rows.pop(id(handle), None)

    def _pending(self) -> list[StartedRow]:
        with self._lock:
            return [r for r in self._rows.values() if not r.done.is_set()]

    def _watch(self) -> None:
        """On a stop: give started rows their grace, then settle the rest as in flight (on a
        cancel, requests still queued at fal are cancelled there first)."""
        while not self.stop.wait(0.2):
            if self._over.is_set():
                return
        deadline = time.monotonic() + self.stop.grace
        sweep = 0.0
        while time.monotonic() < deadline and not self._over.is_set():
            if not self._pending():
                return
            if time.monotonic() >= sweep:
                self._sweep_queued()
                sweep = time.monotonic() + CANCEL_SWEEP_S
            time.sleep(0.1)
        deadline = time.monotonic() + STOP_SUBMIT_WAIT_S
        while not self._over.is_set():
            pending = self._pending()
            if not pending:
                return
            states = [submit_state(r.row.request, r.row.variant) for r in pending]
            if time.monotonic() >= deadline or "submitting" not in states:
                self._sweep_queued()
                for r, state in zip(pending, states, strict=True):
                    r.abandon(submitted=state is not None)
                return
            time.sleep(0.1)

    def _sweep_queued(self) -> None:
        """On a cancel: cancel at fal the started rows' requests still queued there."""
        if self._cancel_queued is None or not self.stop.cancelled:
            return
        for r in self._pending():
            if submit_state(r.row.request, r.row.variant) != "submitted" or not r.claim():
                continue
            try:
                request_id = self._cancel_queued(r.row)
            except Exception:
                request_id = None
            if request_id is not None:
                r.cancelled_at_fal(request_id)
            else:
                r.release()

    def __enter__(self) -> StartedRows:
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._over.set()
