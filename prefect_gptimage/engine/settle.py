"""Rows on a stop: settled as soon as waiting for them is pointless, never mid-submit.

After :meth:`Stop.request <prefect_gptimage.engine.stop.Stop.request>` the engine starts no new
row; each is reported "not started (interrupted)" (:data:`NOT_STARTED`, nothing paid). Of the
rows already started (see :meth:`StartedRows._watch`):

* a row waiting at fal (its submit recorded) is reported "in flight (interrupted)"
  (:data:`IN_FLIGHT`, paid, with its request id) at once and left running at fal: a re-run
  resumes it from the cache without paying again. Waiting for it would not make it end sooner,
  and with many rows queued at fal that wait was what kept a stopped batch alive for 40 s;
* a row that has its result (downloading and staging) gets :attr:`Stop.grace` seconds;
* a row in the middle of its submit is waited for until its submit is recorded (at most the
  grace plus :data:`STOP_SUBMIT_WAIT_S`);
* a row whose submit was never sent (it waits for a fal slot) is reported "not started" after
  :data:`ROW_START_WAIT_S`: its generate path checks the stop before submitting
  (``GenerationOptions.stop``), so it never will.

:class:`StartedRow` is the future the engine waits on, which :class:`StartedRows` (the run's
watcher) can settle before the row's task run ends.

On a cancel through Prefect (:attr:`Stop.cancelled <prefect_gptimage.engine.stop.Stop.cancelled>`)
fal is asked about each row waiting there before it is settled: a request still waiting in
fal's queue is cancelled there (it cost nothing) and its row reported "cancelled at fal while
queued" (:data:`CANCELLED_QUEUED`, nothing paid; a re-run submits it). Requests already running
are reported in flight.
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
from prefect_gptimage.tasks.cache import request_fingerprint
from prefect_gptimage.tasks.generate import IN_FLIGHT, NOT_STARTED, RowInterrupted, not_started
from prefect_gptimage.tasks.intents import read_intent, submit_state

__all__ = [
    "CANCELLED_QUEUED",
    "IN_FLIGHT",
    "NOT_STARTED",
    "ROW_START_WAIT_S",
    "STOP_SUBMIT_WAIT_S",
    "RowInterrupted",
    "SettledRow",
    "StartedRow",
    "StartedRows",
    "not_started",
]

#: A row in the middle of its submit when the grace ends is waited for this long (seconds).
STOP_SUBMIT_WAIT_S = 3.0
#: After a stop, a started row with no submit recorded is settled "not started" after this long
#: (seconds): it waits for a fal slot, and its generate path checks the stop before submitting.
ROW_START_WAIT_S = 0.5
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
        """On a stop, settle each started row as soon as waiting for it is pointless:

        * a row that has its result (downloading, staging: ``Stop.delivering``) gets the grace;
        * a row whose request is at fal (its submit recorded) is settled in flight at once (on a
          cancel, its request is cancelled at fal first if still queued there);
        * a row in the middle of its submit is waited for until the submit is recorded (up to
          the grace plus :data:`STOP_SUBMIT_WAIT_S`), never cut in the middle;
        * a row with no submit (waiting for a fal slot: its generate path checks the stop before
          it submits) is settled "not started" after :data:`ROW_START_WAIT_S`.
        """
        while not self.stop.wait(0.2):
            if self._over.is_set():
                return
        start = time.monotonic()
        grace_end = start + self.stop.grace
        start_end = start + min(self.stop.grace, ROW_START_WAIT_S)
        submit_end = grace_end + STOP_SUBMIT_WAIT_S
        while not self._over.is_set():
            pending = self._pending()
            if not pending:
                return
            now = time.monotonic()
            for r in pending:
                if r.done.is_set():
                    continue
                state = submit_state(r.row.request, r.row.variant)
                if self.stop.delivering(request_fingerprint(r.row.request, r.row.variant)):
                    if now >= grace_end:
                        r.abandon(submitted=True)
                elif state == "submitting":
                    if now >= submit_end:
                        r.abandon(submitted=True)
                elif state is None:
                    if now >= start_end:
                        r.abandon(submitted=False)
                else:
                    self._at_fal(r)
            time.sleep(0.1)

    def _at_fal(self, r: StartedRow) -> None:
        """Settle a row whose request is at fal: cancelled there if still queued (on a cancel),
        else in flight."""
        if self._cancel_queued is not None and self.stop.cancelled and r.claim():
            try:
                request_id = self._cancel_queued(r.row)
            except Exception:
                request_id = None
            if request_id is not None:
                r.cancelled_at_fal(request_id)
                return
            r.release()
        r.abandon(submitted=True)

    def __enter__(self) -> StartedRows:
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._over.set()
