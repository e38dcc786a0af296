"""The receiver resumes suspended batch runs once their callbacks are recorded (issue 20).

A deployment run of the batch flow that suspends while fal works
(:mod:`prefect_gptimage.engine.suspend`) leaves a waiter record and one pointer per request id
(:mod:`prefect_gptimage.tasks.waiters`). Two ways lead here to ``resume_flow_run``, Prefect's
public call:

* **on a callback** (:meth:`Resumer.on_callback`, after the answer to fal is sent): the pointer
  of its request id names the waiting run; once the waiter of the wave the run is suspended on
  is :meth:`~Waiter.ready` (every callback of that wave recorded) the run is resumed. Fast: the
  last callback of a wave resumes the run.
* **a periodic pass** (:meth:`Resumer.pass_once`, every :data:`PASS_EVERY_S` seconds in a
  daemon thread): the flow runs Prefect shows as Suspended are read through the public client,
  and each whose wave's waiter is ready, or older than ``PREFECT_GPTIMAGE_WEBHOOK_SWEEP_AFTER``
  (its missing callbacks then sweep), is resumed.

Which wave a run waits on is read from Prefect, not from memory: its Suspended state's pause
key (:func:`~prefect_gptimage.tasks.waiters.wave_of_key`). So a late callback of an earlier wave
never resumes a run suspended on a later one, and a run suspended with a key that is not ours
is left alone.

The pass is what makes it safe. A callback can land between the run's last read of the records
and its suspend: the run is not PAUSED yet, so the resume on that callback is refused (Prefect's
``NotPausedError``, logged at debug level); the next pass finds the run Suspended and ready and
resumes it. It also finds a run whose pointer names another run (two runs waiting on one
request), a run whose callbacks were all dropped (resumed after the sweep delay), and every run
suspended while the receiver was down (nothing is kept in memory). Two replicas may both resume
one run: the second is refused, harmlessly.
"""

from __future__ import annotations

import logging
import threading
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateName,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.exceptions import FlowPauseTimeout, NotPausedError
from prefect.flow_runs import resume_flow_run

from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.waiters import read_waiter, waiter_of, wave_of_key

__all__ = ["PASS_EVERY_S", "SUSPENDED_PER_PASS", "Resumer"]

logger = logging.getLogger("prefect_gptimage.webhooks")

#: Seconds between two passes over the Suspended flow runs.
PASS_EVERY_S = 5.0
#: Suspended flow runs read per pass, at most.
SUSPENDED_PER_PASS = 200


class Resumer:
    """Resumes the flow runs whose waiters are ready (see the module docs); ``resumed`` counts
    the runs it resumed."""

    def __init__(self, every: float = PASS_EVERY_S) -> None:
        self.every = every
        self.resumed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def on_callback(self, request_id: str) -> None:
        """A callback of ``request_id`` was recorded: resume the run waiting for it if ready."""
        try:
            flow_run_id = waiter_of(request_id)
            if flow_run_id is not None:
                self.check(flow_run_id)
        except Exception as exc:  # the pass tries again: never fail the receiver for this
            logger.warning("cannot check the run waiting for %s: %r", request_id, exc)

    def check(self, flow_run_id: str, pause_key: str | None = None) -> bool:
        """Resume ``flow_run_id`` if the waiter of the wave it is suspended on is ready;
        whether it was resumed now. ``pause_key``: its Suspended state's, when the caller read
        it (else it is read here; a run not suspended is left alone)."""
        if pause_key is None:
            pause_key = _suspended_key(flow_run_id)
        wave = wave_of_key(pause_key)
        waiter = None if wave is None else read_waiter(flow_run_id, wave)
        if waiter is None:
            return False
        missing = waiter.missing()  # read once: the decision and the log line
        if not waiter.ready(get_settings().webhook_sweep_after, missing):
            return False
        with self._lock:  # one resume at a time per receiver: a run resumed once
            try:
                resume_flow_run(UUID(flow_run_id))
            except NotPausedError:  # not suspended yet (the race), or resumed already
                logger.debug("flow run %s is not suspended (yet): not resumed", flow_run_id)
                return False
            except FlowPauseTimeout:
                logger.warning(
                    "flow run %s waited past its suspend timeout and cannot be resumed: run the "
                    "batch again (nothing paid is paid again)",
                    flow_run_id,
                )
                return False
            self.resumed += 1
        logger.info(
            "resumed flow run %s (wave %d): %d of %d callback(s) recorded%s",
            flow_run_id,
            waiter.wave,
            len(waiter.request_ids) - len(missing),
            len(waiter.request_ids),
            " (the rest sweep)" if missing else "",
        )
        return True

    def suspended_runs(self) -> list[tuple[str, str | None]]:
        """The flow runs Prefect shows as Suspended (at most :data:`SUSPENDED_PER_PASS`): each
        one's id and pause key."""
        suspended = FlowRunFilter(
            state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.PAUSED]),
                name=FlowRunFilterStateName(any_=["Suspended"]),
            )
        )
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=suspended, limit=SUSPENDED_PER_PASS)
        return [(str(run.id), _pause_key(run)) for run in runs]

    def pass_once(self) -> int:
        """One pass over the Suspended flow runs: how many it resumed."""
        resumed = 0
        for flow_run_id, pause_key in self.suspended_runs():
            try:
                resumed += self.check(flow_run_id, pause_key)
            except Exception as exc:
                logger.warning("cannot check suspended flow run %s: %r", flow_run_id, exc)
        return resumed

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.pass_once()
            except Exception as exc:  # Prefect's API away: the next pass tries again
                logger.warning("cannot read the suspended flow runs: %r", exc)

    def start(self) -> Resumer:
        """Run the periodic pass in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._loop, name="gptimage-resumer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the periodic pass (waits for a pass in progress, up to a minute)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)


def _pause_key(run: FlowRun) -> str | None:
    """The pause key of ``run``'s state if it is Suspended, else None."""
    state = run.state
    if state is None or state.type != StateType.PAUSED or state.name != "Suspended":
        return None
    return state.state_details.pause_key


def _suspended_key(flow_run_id: str) -> str | None:
    """The pause key of ``flow_run_id`` if Prefect shows it Suspended now, else None."""
    with get_client(sync_client=True) as client:
        return _pause_key(client.read_flow_run(UUID(flow_run_id)))
