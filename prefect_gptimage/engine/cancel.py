"""A cancel through Prefect is a stop: the run's state watched, queued requests cancelled at fal.

Prefect tells nothing to a flow run called in this process when it is cancelled (the UI's Cancel
button, ``prefect flow-run cancel``, the API): the server only moves the run to ``CANCELLING``,
and a worker's runner then ends the process (its own watcher of that state is private). So
:class:`CancelWatch` reads the run's state through the public client every
:data:`CANCEL_POLL_S` seconds and turns ``CANCELLING`` (or ``CANCELLED``) into
``stop.request(CANCELLED)``: the engine starts no new row, rows waiting for a fal slot never
submit, and the run ends Cancelled with its manifest and summary.

:func:`cancel_if_queued` then cancels at fal each request of the run still waiting in fal's
queue: it has cost nothing yet, and a re-run submits it anew (its submit is withdrawn:
:func:`~prefect_gptimage.tasks.intents.withdraw_submit`). Requests already running at fal are
left there, recorded: a re-run collects them without paying again.

In a **deployment run** the worker's runner (``serve``, ``prefect worker``) reacts to the same
``CANCELLING`` through Prefect's control channel, then sends the flow-run process SIGTERM, which
Prefect's own handler turns into :class:`~prefect.exceptions.TerminationSignal` in the main
thread: raised inside the row engine, it would unwind the run where it stands (no manifest, no
summary, rows waiting at fal). So :func:`run_beside_sigterm` runs a deployment run's row engine
in a thread of its own while the main thread only waits: the signal lands in that wait, becomes
``stop.request`` (``CANCELLED`` if the run is being cancelled, else ``"SIGTERM"``, a worker shutting
down), the engine settles and writes its report, and then the signal is raised again for Prefect,
which ends the run CANCELLED as it ends any run its runner cancels: one line, no traceback.
Prefect's handler stays installed throughout, which is what lets it acknowledge the runner's
cancel (it does only while its own handler is installed). A cancel this package saw first (its
poll) waits for the runner's signal (:data:`RUNNER_SIGNAL_WAIT_S` at most) once the report is
written, so the run still ends through Prefect's cancel; when none comes, the flow's own
Cancelled state ends it.

Example:
    >>> with CancelWatch(stop):  # doctest: +SKIP
    ...     run_beside_sigterm(stop, engine_body)  # a cancel sets stop.requested within seconds
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.exceptions import TerminationSignal
from prefect.logging import get_logger

from prefect_gptimage._run_context import current_flow_run
from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.engine.stop import CANCELLED, Stop
from prefect_gptimage.fal.polling import RequestState
from prefect_gptimage.prompts import PromptRow
from prefect_gptimage.tasks.intents import read_intent, withdraw_submit
from prefect_gptimage.tasks.queue import sync_client

__all__ = [
    "CANCEL_POLL_S",
    "RUNNER_SIGNAL_WAIT_S",
    "CancelWatch",
    "cancel_if_queued",
    "run_beside_sigterm",
]

T = TypeVar("T")

#: How often (seconds) the run's state is read for a cancel: a cancel stops the run within this.
CANCEL_POLL_S = 2.0

#: How long (seconds) a cancelled deployment run, its report written, waits for its runner's
#: cancel (sent on seeing CANCELLING; Prefect's runner polls every 10 s by default), so that the
#: run ends through Prefect's own cancel: no traceback, its last logs shipped.
RUNNER_SIGNAL_WAIT_S = 20.0
#: How often (seconds) the waiting main thread wakes: a signal's handler runs between waits.
_WAIT_SLICE_S = 0.5

logger = get_logger("prefect_gptimage.cancel")


class CancelWatch:
    """Watches the current flow run (if any) for a cancel; a context manager around the run.

    Outside a flow run, or when the API cannot be read, it does nothing (a read that fails is
    retried at the next poll: an API that blips never stops a run).
    """

    def __init__(self, stop: Stop, every: float = CANCEL_POLL_S) -> None:
        self.stop, self.every = stop, every
        run = current_flow_run()
        self.flow_run_id = run.id if run is not None else None
        self._over = threading.Event()  # the run is over: stop watching
        self._thread = threading.Thread(
            # in the flow's context: its settings say which API to ask
            target=contextvars.copy_context().run,
            args=(self._watch,),
            name="gptimage-cancel-watcher",
            daemon=True,
        )

    def _watch(self) -> None:
        if self.flow_run_id is None:
            return
        with get_client(sync_client=True) as client:
            while not self.stop.requested and not self._over.wait(self.every):
                if _stop_if_cancelling(client, self.stop, self.flow_run_id):
                    return

    def __enter__(self) -> CancelWatch:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._over.set()


def _stop_if_cancelling(client: Any, stop: Stop, flow_run_id: UUID) -> bool:
    """Stop the run (``CANCELLED``) if Prefect shows it CANCELLING or CANCELLED; whether it did
    (False too when the state cannot be read: the caller asks again, or it is no cancel)."""
    try:
        state = client.read_flow_run(flow_run_id).state
    except Exception as exc:  # the next poll asks again
        logger.debug("could not read the flow run's state: %s", exc)
        return False
    if state is None or not (state.is_cancelling() or state.is_cancelled()):
        return False
    logger.warning(
        "the flow run is being cancelled: no new request is submitted; requests queued at fal "
        "are cancelled there, those running are left to finish and a re-run collects them "
        "without paying again"
    )
    stop.request(CANCELLED)
    return True


def _stop_for_signal(stop: Stop, flow_run_id: UUID) -> None:
    """SIGTERM reached a deployment run: a cancel if Prefect shows one, else a shutdown."""
    if stop.requested:
        return
    with get_client(sync_client=True) as client:
        if _stop_if_cancelling(client, stop, flow_run_id):
            return
    logger.warning(
        "SIGTERM: no new request is submitted; requests at fal are left there and a re-run "
        "collects them without paying again"
    )
    stop.request("SIGTERM")


def run_beside_sigterm(
    stop: Stop, body: Callable[[], T], handing_over: Callable[[T], None] | None = None
) -> T:
    """``body()``, the row engine; in a deployment run's main thread, run in a thread of its own
    beside Prefect's SIGTERM handling (see the module docs): a SIGTERM stops it through
    ``stop``, and once it has settled, a cancel is handed back to Prefect as its
    :class:`~prefect.exceptions.TerminationSignal` (``handing_over(result)`` first: the run's
    state message is then Prefect's, so the caller logs its own). Elsewhere a plain call."""
    run = current_flow_run()
    if run is None or run.deployment_id is None:
        return body()
    if threading.current_thread() is not threading.main_thread():
        return body()
    results: list[T] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def target() -> None:
        try:
            results.append(body())
        except BaseException as exc:  # handed to the main thread as it is
            errors.append(exc)
        finally:
            done.set()

    engine = threading.Thread(
        target=contextvars.copy_context().run, args=(target,), name="gptimage-row-engine"
    )
    engine.start()
    received = _signal_during(done)
    if received is not None:  # which stop: asked off this thread (a signal may come again)
        threading.Thread(
            target=contextvars.copy_context().run,
            args=(_stop_for_signal, stop, run.id),
            name="gptimage-sigterm",
            daemon=True,
        ).start()
        while not done.is_set():  # the engine settles; a repeated signal changes nothing
            _signal_during(done)
    engine.join()
    if errors:
        raise errors[0]
    if stop.cancelled:
        received = received or _signal_during(threading.Event(), RUNNER_SIGNAL_WAIT_S)
        if received is not None:
            if handing_over is not None:
                handing_over(results[0])
            raise received  # Prefect's cancel ends the run: CANCELLED, one line
    return results[0]


def _signal_during(
    event: threading.Event, timeout: float | None = None
) -> TerminationSignal | None:
    """Wait in the main thread until ``event`` is set (or ``timeout`` seconds pass), in slices
    so that Prefect's SIGTERM handler can raise between them: the signal if it came, else None."""
    waited = 0.0
    while not event.is_set() and (timeout is None or waited < timeout):
        try:
            event.wait(_WAIT_SLICE_S)
        except TerminationSignal as signal_:
            return signal_
        waited += _WAIT_SLICE_S
    return None


def cancel_if_queued(row: PromptRow, credentials: FalCredentials | None) -> str | None:
    """Cancel ``row``'s request at fal if it is still waiting in fal's queue (it has cost
    nothing) and withdraw its submit, so a re-run submits it anew; its request id if cancelled,
    else None (never submitted, already running or done, or fal could not be asked)."""
    try:
        intent = read_intent(row.request, row.variant)
        if intent is None or intent.state != "submitted" or intent.handle is None:
            return None
        handle = intent.handle
        client = sync_client(credentials)
        if client.status(handle).state is not RequestState.IN_QUEUE:
            return None
        if not client.cancel(handle, quiet=True):
            return None
        withdraw_submit(
            row.request,
            row.variant,
            f"{handle.request_id} was cancelled at fal while queued (the flow run was "
            "cancelled): nothing was paid",
        )
    except Exception as exc:
        logger.warning("could not cancel a queued request at fal: %s", exc)
        return None
    logger.info("cancelled %s at fal while it was queued: nothing paid", handle.request_id)
    return handle.request_id
