"""A request to stop a run, passed in as an object: the one place a stop lands.

The CLI creates one :class:`Stop`, hands it to the flow (``stop=``) and calls :meth:`Stop.request`
from its signal handler; the engine checks it before starting each row and gives rows that are
downloading and staging their images :attr:`Stop.grace` seconds (rows still waiting at fal are
settled at once: see :mod:`prefect_gptimage.engine.settle`). A cancel through Prefect (UI,
``prefect flow-run cancel``, API) lands here too, as ``request(CANCELLED)`` (see
:mod:`prefect_gptimage.engine.cancel`): then requests still queued at fal are cancelled there as
well, and the run ends Cancelled. Nothing about a stop lives in a module global.

Example:
    >>> stop = Stop()
    >>> stop.requested
    False
    >>> stop.request("SIGTERM")
    >>> stop.requested, stop.reason
    (True, 'SIGTERM')
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["CANCELLED", "STOP_GRACE_S", "Stop"]

#: The reason of a stop that is Prefect cancelling the flow run.
CANCELLED = "cancelled"

#: After a stop, how long (seconds) rows that have their result from fal may take to download and
#: stage it. Rows still waiting at fal are reported in flight at once (left at fal, resumed by a
#: re-run without paying again): their wait would end no sooner for the stop.
STOP_GRACE_S = 4.0


class Stop:
    """One run's stop request: safe to set from a signal handler or another thread.

    ``summary`` is what the engine has reported so far (set by the engine when the run starts),
    so a process that must exit early can still print it.
    """

    def __init__(self, grace: float = STOP_GRACE_S) -> None:
        self.grace = grace
        self.reason: str | None = None
        self.summary: Any = None
        self._event = threading.Event()
        self._delivering: set[str] = set()
        self._salvage: list[Callable[[], object]] = []

    def request(self, reason: str = "interrupted") -> None:
        """Ask the run to stop (idempotent: the first reason is kept)."""
        if self.reason is None:
            self.reason = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        """Whether a stop was requested."""
        return self._event.is_set()

    @property
    def cancelled(self) -> bool:
        """Whether the stop is Prefect cancelling the run (not a signal): requests still queued
        at fal are cancelled there (they cost nothing yet) and the run ends Cancelled."""
        return self.requested and self.reason == CANCELLED

    def note_delivering(self, key: str) -> None:
        """A row (``key``: its request's fingerprint) has its result from fal and is now only
        downloading and staging: a stop gives it the grace to finish. A row still waiting at
        fal is not worth the wait: it is settled as in flight at once."""
        self._delivering.add(key)

    def delivering(self, key: str) -> bool:
        """Whether the row ``key`` noted it has its result (:meth:`note_delivering`)."""
        return key in self._delivering

    def on_hard_exit(self, salvage: Callable[[], object]) -> None:
        """Register what to save if the process must leave before the run closes its report
        (the engine registers putting the manifest in place)."""
        self._salvage.append(salvage)

    def salvage(self) -> None:
        """Run what :meth:`on_hard_exit` registered (each failure ignored): called by a process
        that leaves before the run ended (the CLI's watchdog)."""
        for fn in self._salvage:
            with contextlib.suppress(Exception):
                fn()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested or ``timeout`` passes; True if requested."""
        return self._event.wait(timeout)

    def __getstate__(self) -> dict[str, Any]:
        # a flow parameter travels with the flow run's context (e.g. to Dask workers): there a
        # stop is only what was requested so far; the event and the live summary stay here
        return {"grace": self.grace, "reason": self.reason}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["grace"])  # type: ignore[misc]
        if state["reason"] is not None:
            self.request(state["reason"])

    def __repr__(self) -> str:  # flows log their parameters: keep it short
        return f"Stop(requested={self.requested})"
