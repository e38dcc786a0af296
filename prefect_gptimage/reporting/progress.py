"""Live progress of a long batch: a throttled Prefect progress artifact, plus an ETA for logs.

:class:`BatchProgress` is fed from many worker threads (one ``advance()`` per finished item) but
talks to the Prefect API only when progress moved noticeably, so a 10,000-item batch costs about
50 API calls. Progress is cosmetic: it never fails the batch. :func:`format_duration` renders the
elapsed time and ETA.

Example:
    >>> format_duration(3725)
    '1h02m05s'
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from uuid import UUID

from prefect_gptimage._run_context import call_sync, in_run, run_logger
from prefect_gptimage.reporting.artifact_keys import artifact_key

__all__ = ["BatchProgress", "format_duration"]

_log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1h02m05s'``; ``42.4`` -> ``'42s'``.

    Example:
        >>> format_duration(125)
        '2m05s'
    """
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class BatchProgress:
    """A Prefect progress artifact for a long batch, with throttled, thread-safe updates.

    ``advance()`` is cheap and may be called from many threads; the artifact is updated only when
    progress moved at least ``min_step`` percentage points, or ``min_interval`` seconds passed,
    since the last update, so a 10,000-item batch makes about 50 API calls, not 10,000.
    Progress is best effort: an API failure is logged, never raised. :meth:`eta` gives a human
    ETA for logs.

    Example:
        >>> progress = BatchProgress().start(len(prompts), "nightly-progress")  # doctest: +SKIP
        >>> for future in futures:  # doctest: +SKIP
        ...     future.wait(); progress.advance()
        ...     logger.info("%s", progress.status())
        >>> progress.finish()  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        min_step: float = 2.0,
        min_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_step = min_step
        self.min_interval = min_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._total = 0
        self._done = 0
        self._started_at = clock()
        self._sent_pct = -1.0
        self._sent_at = float("-inf")
        self.key: str | None = None
        self.artifact_id: UUID | None = None
        self.updates = 0  # API update calls made (not counting the create)

    # -- state ---------------------------------------------------------------------------------

    @property
    def total(self) -> int:
        return self._total

    @property
    def done(self) -> int:
        return self._done

    @property
    def fraction(self) -> float:
        with self._lock:
            return 1.0 if self._total <= 0 else min(1.0, self._done / self._total)

    @property
    def percent(self) -> float:
        return round(self.fraction * 100.0, 2)

    @property
    def elapsed(self) -> float:
        return max(0.0, self._clock() - self._started_at)

    def eta_seconds(self) -> float | None:
        """Seconds left, from the elapsed time and the fraction done (None while unknown)."""
        fraction = self.fraction
        if fraction >= 1.0:
            return 0.0
        if fraction <= 0.0:
            return None
        return self.elapsed * (1.0 - fraction) / fraction

    def eta(self) -> str:
        """``'ETA 3m12s'``, ``'done'`` or ``'ETA unknown'``."""
        left = self.eta_seconds()
        if left is None:
            return "ETA unknown"
        return "done" if left == 0 else f"ETA {format_duration(left)}"

    def status(self) -> str:
        """``'120/10000 (1.2%), 35s elapsed, ETA 48m01s'`` for logs."""
        return (
            f"{self._done}/{self._total} ({self.percent:.1f}%), "
            f"{format_duration(self.elapsed)} elapsed, {self.eta()}"
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, total: int, key: str, description: str | None = None) -> BatchProgress:
        """Create the progress artifact at 0 % (``key`` is sanitized with :func:`artifact_key`).

        Outside a flow or task run no artifact is made (that is deprecated in Prefect 3); counts
        and :meth:`eta` still work.
        """
        from prefect.artifacts import acreate_progress_artifact

        with self._lock:
            self._total = max(0, int(total))
            self._done = 0
            self._started_at = self._clock()
        self.key = artifact_key(key)
        if not in_run():
            run_logger(_log).debug(
                "no flow run: progress %r is tracked without an artifact", self.key
            )
            self.artifact_id = None
            return self
        try:
            self.artifact_id = call_sync(
                acreate_progress_artifact,
                progress=0.0,
                key=self.key,
                description=description or f"{self._total} items",
            )
            self._sent_pct, self._sent_at = 0.0, self._clock()
        except Exception as exc:  # progress is cosmetic: never fail the batch for it
            run_logger(_log).warning("could not create progress artifact %r: %s", self.key, exc)
            self.artifact_id = None
        return self

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items done (thread-safe); update the artifact if it is due.

        The update is an API call: it runs in a thread of its own, so the caller (a batch's row
        dispatch) never waits for the API. Only one update is in flight; a call while one is
        leaves its progress to a later one.
        """
        with self._lock:
            self._done = min(self._done + n, self._total) if self._total else self._done + n
        if self.artifact_id is None or not self._due(self.percent, self._clock()):
            return
        if not self._send_lock.acquire(blocking=False):
            return
        context = contextvars.copy_context()  # the run's Prefect context, in the thread too
        threading.Thread(
            target=context.run, args=(self._send_held, False), name="gptimage-progress", daemon=True
        ).start()

    def finish(self) -> None:
        """Mark everything done and set the artifact to 100 % (after any update in flight)."""
        with self._lock:
            self._done = max(self._done, self._total)
        if self.artifact_id is None:
            return
        self._send_lock.acquire()
        self._send_held(True)

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until no artifact update is in flight (e.g. before reading :attr:`updates`)."""
        if self._send_lock.acquire(timeout=timeout):
            self._send_lock.release()

    def _due(self, pct: float, now: float) -> bool:
        return pct - self._sent_pct >= self.min_step or (
            now - self._sent_at >= self.min_interval and pct > self._sent_pct
        )

    def _send_held(self, force: bool) -> None:
        """Send the progress if due; the caller holds ``_send_lock``, released here."""
        try:
            pct = self.percent
            now = self._clock()
            if not (self._due(pct, now) or (force and pct != self._sent_pct)):
                return
            from prefect.artifacts import aupdate_progress_artifact

            call_sync(aupdate_progress_artifact, artifact_id=self.artifact_id, progress=pct)
            self._sent_pct, self._sent_at = pct, now
            self.updates += 1
        except Exception as exc:
            run_logger(_log).warning("could not update progress artifact %r: %s", self.key, exc)
        finally:
            self._send_lock.release()
