"""The bookkeeping of one wait: fal's logs and queue position, pacing, the deadline, and the
error of a request that ended failed. Used by :func:`prefect_gptimage.fal._core.wait`.

Every wait has a deadline: without one given, :data:`DEFAULT_REQUEST_TIMEOUT`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect_gptimage.errors import FalError, FalRequestFailed, FalRequestTimeout
from prefect_gptimage.fal.polling import LATENCY, RequestStatus, next_poll_delay, observed_duration
from prefect_gptimage.retry import detail_text
from prefect_gptimage.schemas import RequestHandle

#: Seconds a wait lasts, queue time and run time together, when no timeout is given. fal's
#: observed p95 latency for GPT Image 1.5 is about 80 s; 600 s leaves room for a queue behind a
#: full account concurrency limit, yet a request stuck IN_QUEUE is cancelled and reported.
DEFAULT_REQUEST_TIMEOUT = 600.0


def request_failed(
    current: RequestStatus, handle: RequestHandle, result_error: FalError | None
) -> FalRequestFailed:
    """The request ended with an error: fal's own message, and the result's status code."""
    text = current.error or (result_error.message if result_error else "unknown error")
    if result_error is not None and result_error.detail:
        text = detail_text(result_error.detail)
    error_type = current.error_type or (result_error.error_type if result_error else None)
    label = f" ({error_type})" if error_type else ""
    return FalRequestFailed(
        f"fal request {handle.request_id} failed{label}: {text}",
        status_code=result_error.status_code if result_error else None,
        error_type=error_type,
        request_id=handle.request_id,
        detail=result_error.detail if result_error else current.error,
    )


class WaitTracker:
    """Logging and pacing state of one wait."""

    def __init__(
        self,
        handle: RequestHandle,
        timeout: float | None,
        log: logging.Logger | logging.LoggerAdapter[Any],
    ) -> None:
        self.handle = handle
        self.log = log
        self.started = time.monotonic()
        self.deadline = self.started + (DEFAULT_REQUEST_TIMEOUT if timeout is None else timeout)
        self.submitted = handle.submitted_at or time.time()
        self.polls = 0
        self.logs_seen = 0
        self.position: int | None = None
        self.last_pending: float | None = None
        self.queued = False
        # learn only from waits that watched the request from its submit on
        self.learning = bool(handle.profile) and time.time() - self.submitted < 2.0

    def update(self, current: RequestStatus) -> None:
        self.polls += 1
        if current.queue_position is not None and current.queue_position != self.position:
            self.log.info(
                "fal request %s is queued at position %d",
                self.handle.request_id,
                current.queue_position,
            )
        self.position = current.queue_position
        for entry in current.logs[self.logs_seen :]:
            self.log.info("fal [%s] %s", entry.get("level", "INFO"), entry.get("message", ""))
        self.logs_seen = max(self.logs_seen, len(current.logs))
        elapsed = time.time() - self.submitted
        self.queued = self.queued or current.queue_position is not None
        if not current.done:
            self.last_pending = elapsed
        elif self.learning and not current.error and not self.queued and self.handle.profile:
            LATENCY.observe(self.handle.profile, observed_duration(self.last_pending, elapsed))

    def timed_out(self) -> bool:
        return time.monotonic() >= self.deadline

    def delay(self) -> float:
        expected = LATENCY.expected(self.handle.profile) if self.handle.profile else None
        d = next_poll_delay(
            expected,
            elapsed=time.time() - self.submitted,
            polls=self.polls,
            queue_position=self.position,
        )
        return min(d, max(0.0, self.deadline - time.monotonic()))

    def timeout_error(self) -> FalRequestTimeout:
        waited = time.monotonic() - self.started
        return FalRequestTimeout(
            f"fal request {self.handle.request_id} did not complete within {waited:.1f}s; "
            "it was cancelled",
            request_id=self.handle.request_id,
        )
