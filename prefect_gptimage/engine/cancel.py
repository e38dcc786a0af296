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
``CANCELLING`` by sending the flow-run process SIGTERM, which Prefect's own handler turns into an
exception that unwinds the flow where it stands: no manifest, no summary, and the run's task
runner joined while rows wait at fal. So while a deployment run's rows run, :class:`CancelWatch`
handles SIGTERM itself: it reads the run's state at once and stops the engine, ``CANCELLED`` if
the run is being cancelled, else ``"SIGTERM"`` (a worker shutting down). The runner waits for the
process (30 s) while the engine settles, in a few seconds; a cancelled run waits for that SIGTERM
(:data:`RUNNER_SIGNAL_WAIT_S` at most) before it gives the handler back, so a late one cannot end
the process before its last logs reach the API. (Prefect acknowledges its runner's cancel intent
only while its own handler is installed, so the run ends through the flow's Cancelled state:
Prefect then logs "Engine execution exited with unexpected exception" for it; see
``docs/api-gaps.md``.)

Example:
    >>> with CancelWatch(stop):  # doctest: +SKIP
    ...     ...  # the run; a cancel in Prefect's UI sets stop.requested within CANCEL_POLL_S
"""

from __future__ import annotations

import contextvars
import signal
import threading
from types import FrameType, TracebackType
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.logging import get_logger

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.engine.stop import CANCELLED, Stop
from prefect_gptimage.fal.polling import RequestState
from prefect_gptimage.prompts import PromptRow
from prefect_gptimage.tasks.intents import read_intent, withdraw_submit
from prefect_gptimage.tasks.queue import sync_client

__all__ = ["CANCEL_POLL_S", "RUNNER_SIGNAL_WAIT_S", "CancelWatch", "cancel_if_queued"]

#: How often (seconds) the run's state is read for a cancel: a cancel stops the run within this.
CANCEL_POLL_S = 2.0

#: How long (seconds) a cancelled deployment run, its report written, waits for its runner's
#: SIGTERM (sent on seeing CANCELLING; Prefect's runner polls every 10 s by default) before it
#: gives SIGTERM back to Prefect: a later one would end the process before its logs are shipped.
RUNNER_SIGNAL_WAIT_S = 20.0

logger = get_logger("prefect_gptimage.cancel")


class CancelWatch:
    """Watches the current flow run (if any) for a cancel; a context manager around the run.

    Outside a flow run, or when the API cannot be read, it does nothing (a read that fails is
    retried at the next poll: an API that blips never stops a run). In a deployment run's main
    thread it also handles SIGTERM while it is entered (see the module docs).
    """

    def __init__(self, stop: Stop, every: float = CANCEL_POLL_S) -> None:
        self.stop, self.every = stop, every
        context = FlowRunContext.get()
        run = context.flow_run if context is not None else None
        self.flow_run_id: UUID | None = run.id if run is not None else None
        self._deployment_run = run is not None and run.deployment_id is not None
        self._over = False
        self._wake = threading.Event()  # the run is over, or SIGTERM came: look now
        self._sigterm = threading.Event()  # SIGTERM came
        self._previous: Any = None
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
            while not self.stop.requested:
                self._wake.wait(self.every)
                self._wake.clear()
                if self._over:
                    return
                try:
                    state = client.read_flow_run(self.flow_run_id).state
                except Exception as exc:  # the next poll asks again
                    logger.debug("could not read the flow run's state: %s", exc)
                    state = None
                if state is not None and (state.is_cancelling() or state.is_cancelled()):
                    logger.warning(
                        "the flow run is being cancelled: no new request is submitted; requests "
                        "queued at fal are cancelled there, those running are left to finish "
                        "and a re-run collects them without paying again"
                    )
                    self.stop.request(CANCELLED)
                    return
                if self._sigterm.is_set():
                    logger.warning(
                        "SIGTERM: no new request is submitted; requests at fal are left there "
                        "and a re-run collects them without paying again"
                    )
                    self.stop.request("SIGTERM")
                    return

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._sigterm.set()
        self._wake.set()

    def __enter__(self) -> CancelWatch:
        if self._deployment_run and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._over = True
        self._wake.set()
        previous, self._previous = self._previous, None
        if previous is None:
            return
        if self.stop.cancelled and exc_type is None:
            # the runner's SIGTERM for this cancel lands here (at once if it came already), not
            # after the engine has restored the default handler, which would end the process
            # before its last logs reach the API
            self._sigterm.wait(RUNNER_SIGNAL_WAIT_S)
        signal.signal(signal.SIGTERM, previous)


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
