"""SIGTERM and SIGINT during ``generate`` and ``batch``: stop submitting, cancel nothing, exit soon.

Prefect workers and Kubernetes stop a run with SIGTERM; a user with Ctrl+C. Each command holds
one :class:`~prefect_gptimage.engine.stop.Stop` (:attr:`Interrupts.stop`) and hands it to its
flow. On the first signal:

* before the flow starts (imports, validation, the temporary API server), the command stops at
  once: nothing was submitted;
* during a batch, the handler calls ``stop.request("SIGTERM")`` (or ``"SIGINT"``), nothing
  more: the engine starts no new row (rows not started are reported "not started
  (interrupted)"), reports rows waiting at fal "in flight (interrupted)" at once (their submit
  recorded, never cut in the middle), and gives rows that are staging their images
  ``stop.grace`` seconds (:mod:`prefect_gptimage.engine.settle`). A batch of any size so ends
  within seconds: the wait no longer grows with the rows queued at fal. Nothing is cancelled at fal:
  every submit's intent and handle are on disk, so a re-run resumes those requests and pays for
  nothing twice. The command prints its summary (what was staged) as usual;
* during ``generate``, the request gets the same ``stop.grace`` seconds, then is left running at
  fal once its submit is recorded (a re-run resumes it).

One watchdog thread bounds it all: the process is gone within :data:`HARD_EXIT_S` seconds of the
first signal (printing ``stop.summary``, what the engine staged so far), and at once on a second
signal. The exit status is 130 after SIGINT and 143 after SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from prefect_gptimage.engine.stop import Stop
from prefect_gptimage.errors import StopBeforeStart

__all__ = ["HARD_EXIT_S", "Interrupts", "submit_in_progress"]

#: How long (seconds) after the grace a submit in progress may take to be recorded.
SUBMIT_RECORD_S = 3.0
#: After a stop, how long (seconds) Prefect's log and event workers may take to send what they
#: hold before the process leaves.
DRAIN_S = 2.0
#: The process is gone this many seconds after the first signal at the latest (the grace, a
#: submit's recording, and the summary's writing).
HARD_EXIT_S = Stop().grace + SUBMIT_RECORD_S + 2.0
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def submit_in_progress(request: Any, variant: int = 0) -> bool:
    """Whether this request's submit was sent and fal's answer is not recorded yet.

    The one answer is :func:`prefect_gptimage.tasks.intents.submit_state` (an unreadable store
    counts as "in progress"), imported here only when asked: the CLI loads this module before
    Prefect.
    """
    from prefect_gptimage.tasks.intents import submit_state

    return submit_state(request, variant) == "submitting"


class Interrupts:
    """The signal handlers of one command, and the :class:`Stop` its flow is handed."""

    def __init__(self, stop: Stop | None = None) -> None:
        self.stop = stop or Stop()
        self.signum: int | None = None
        self.running = False  # the flow was called: stop it instead of unwinding
        self.returned = False  # the flow returned: the command prints its own summary
        #: ``generate``: the request whose submit must not be cut in the middle (a batch's rows
        #: are the engine's to settle)
        self.request: Any = None
        #: prints the run's summary; called with ``stop.summary`` on a hard exit
        self.print_summary: Callable[[Any], object] | None = None
        self._previous: dict[int, Any] = {}

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM (128 + the signal's number)."""
        return 128 + int(self.signum or 0)

    def install(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def reclaim(self, *_hook_args: Any) -> None:
        """Take the signals back inside a flow run (an ``on_running`` hook).

        Prefect's flow engine replaces the SIGTERM handler for the run with one that raises in
        the flow (the run crashes, and the threads it waits for hold the exit); it restores ours
        when the run ends.
        """
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        self._previous.clear()

    def _say(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            print(f"prefect-gptimage: {text}", file=sys.stderr, flush=True)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: leave now
            self._say(f"{signal.Signals(signum).name} again: exiting now")
            self.leave()
        self.signum = signum
        name = signal.Signals(signum).name
        if not self.running:
            raise StopBeforeStart(f"{name}: stopped before anything was submitted")
        self._say(
            f"{name}: stopping: no new request is submitted; requests already at fal are left "
            "running there (not cancelled) and a re-run resumes them without paying again"
        )
        self.stop.request(name)
        threading.Thread(target=self._watchdog, name="prefect-gptimage-stop", daemon=True).start()

    def _watchdog(self) -> None:
        """The one bound on a stop: leave when the flow has not returned in time.

        ``generate`` leaves after the grace, as soon as its request's submit is not in progress;
        a batch waits for its flow (which settles its own rows after the same grace) until
        :data:`HARD_EXIT_S`.
        """
        started = time.monotonic()
        grace_over = started + self.stop.grace
        hard = started + HARD_EXIT_S
        while not self.returned and time.monotonic() < hard:
            if (
                self.request is not None
                and time.monotonic() >= grace_over
                and not submit_in_progress(self.request)
            ):
                break
            time.sleep(0.1)
        if self.returned:
            return
        if self.request is not None:
            self._say(
                "interrupted: 0 image(s) staged; a request already submitted is left in flight at "
                "fal, not cancelled: run the same command again to resume it (nothing is paid "
                "twice)"
            )
        else:
            self._say(
                "interrupted: exiting before the run finished its summary; the manifest so far "
                "is in the run's folder, not staged"
            )
            self.stop.salvage()
            if self.print_summary is not None and self.stop.summary is not None:
                with contextlib.suppress(Exception):
                    self.print_summary(self.stop.summary)
        self.leave()

    def leave(self, code: int | None = None) -> None:
        """Exit now with ``code`` (None: this signal's status), without waiting for worker
        threads."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(self.exit_code if code is None else code)

    def finish(self, code: int) -> int:
        """The command's exit status once it returned: the signal's, if one came.

        Worker threads still waiting on fal would hold the interpreter's exit until they end
        (the interpreter joins every executor thread at exit, daemon or not: with requests
        queued at fal for minutes, a stopped batch lived on that long). So after a signal, or a
        cancel through Prefect, the process leaves without them once Prefect's log and event
        workers have sent what they hold (:data:`DRAIN_S` at most): what the rows paid for is
        recorded, and a re-run collects it. Prefect's temporary API server is stopped by the
        CLI's guard (:mod:`prefect_gptimage.cli._server`).
        """
        if self.signum is None and not self.stop.requested:
            return code
        if self.signum is not None:
            code = self.exit_code
        _drain_prefect(DRAIN_S)
        self.leave(code)
        return code  # pragma: no cover - leave() does not return


def _drain_prefect(timeout: float) -> None:
    """Send what Prefect's log and event workers still hold, waiting ``timeout`` s at most
    (nothing to do when Prefect was never imported)."""
    if "prefect" not in sys.modules:
        return

    def drain() -> None:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for worker in (APILogWorker, EventsWorker):
            with contextlib.suppress(Exception):
                worker.drain_all(timeout=timeout)

    worker = threading.Thread(target=drain, name="prefect-gptimage-drain", daemon=True)
    worker.start()
    worker.join(timeout)
