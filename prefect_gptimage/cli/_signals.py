"""SIGTERM and SIGINT during ``generate`` and ``batch``: stop submitting, cancel nothing, exit soon.

Prefect workers and Kubernetes stop a run with SIGTERM; a user with Ctrl+C. On the first signal:

* before the flow starts (imports, validation), the command stops at once: nothing was
  submitted, or what the head start submitted is recorded (a re-run resumes it);
* during a batch, no new row is started (:func:`prefect_gptimage.flows.batch.request_stop`): rows
  not started are reported "not started (interrupted)", rows already at fal get a few seconds to
  finish, then are reported "in flight (interrupted)" once their submit is recorded. Nothing is
  cancelled at fal: every submit's intent and handle are on disk, so a re-run resumes those
  requests and pays for nothing twice. The command prints its summary (what was staged) as usual;
* during ``generate``, the request gets the same few seconds, then is left running at fal (a
  re-run resumes it).

The exit status is 130 after SIGINT and 143 after SIGTERM. Whatever happens, the process is gone
within :data:`HARD_EXIT_S` seconds of the first signal (printing what was staged so far), and at
once on a second signal.
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

from prefect_gptimage.errors import StopBeforeStart

__all__ = ["HARD_EXIT_S", "Interrupts"]

#: The process is gone this many seconds after the first signal at the latest.
HARD_EXIT_S = 9.0
#: ``generate``: seconds the request may take to finish after a signal before it is left at fal.
GENERATE_GRACE_S = 4.0
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """The signal handlers of one command (see the module docstring)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.running = False  # the flow was called: stop it instead of unwinding
        self.submitted_ahead = False  # the head start sent requests before the flow started
        self.returned = False  # the flow returned: the command prints its own summary
        #: what to print when the process must go before the flow returns (a batch's summary)
        self.last_words: Callable[[], None] | None = None
        #: ``generate``: the request whose submit must not be cut in the middle
        self.request: Any = None
        self.cleanups: list[Callable[[], None]] = []
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
        if not self.running and self.submitted_ahead:
            raise StopBeforeStart(
                f"{name}: stopped during start-up; requests already submitted are recorded and "
                "a re-run resumes them without paying again"
            )
        if not self.running:
            raise StopBeforeStart(f"{name}: stopped before anything was submitted")
        self._say(
            f"{name}: stopping: no new request is submitted; requests already at fal are left "
            "running there (not cancelled) and a re-run resumes them without paying again"
        )
        batch = sys.modules.get("prefect_gptimage.flows.batch")
        if batch is not None:
            batch.request_stop()
        threading.Thread(target=self._watchdog, name="prefect-gptimage-stop", daemon=True).start()

    def _watchdog(self) -> None:
        started = time.monotonic()
        hard = started + HARD_EXIT_S
        if self.request is not None:  # generate: a grace, then leave once no submit is mid-way
            while time.monotonic() < started + GENERATE_GRACE_S and not self.returned:
                time.sleep(0.1)
            while time.monotonic() < hard and not self.returned and self._mid_submit():
                time.sleep(0.1)
            if not self.returned:
                self._say(
                    "interrupted: 0 image(s) staged; the request is in flight at fal, not "
                    "cancelled: run the same command again to resume it (nothing is paid twice)"
                )
                self.leave()
            return
        while time.monotonic() < hard:
            if self.returned:
                return
            time.sleep(0.1)
        if not self.returned:
            self._say("interrupted: exiting before the run finished its summary")
            if self.last_words is not None:
                with contextlib.suppress(Exception):
                    self.last_words()
            self.leave()

    def _mid_submit(self) -> bool:
        try:
            from prefect_gptimage.tasks.intents import read_intent

            intent = read_intent(self.request, 0)
        except Exception:
            return False
        return intent is not None and intent.state == "submitting"

    def leave(self) -> None:
        """Exit now with this signal's status, without waiting for worker threads."""
        for cleanup in self.cleanups:
            with contextlib.suppress(Exception):
                cleanup()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(self.exit_code)

    def finish(self, code: int) -> int:
        """The command's exit status once it returned: the signal's, if one came.

        Worker threads still waiting on fal would hold the interpreter's exit until they end:
        after a signal, the process leaves without them (what they paid for is recorded).
        """
        if self.signum is None:
            return code
        others = [
            t
            for t in threading.enumerate()
            if t is not threading.main_thread() and t.is_alive() and not t.daemon
        ]
        if others:
            self.leave()
        return self.exit_code
