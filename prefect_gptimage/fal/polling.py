"""Request status, and an adaptive polling schedule that learns how long requests take.

fal_client polls every 0.1 s, which costs ~10 status calls per second of generation. The
:class:`LatencyModel` keeps a moving average of how long requests took (per endpoint, quality and
size) and :func:`next_poll_delay` sleeps until just after the expected completion, then backs off
with jitter. Before anything is learned it starts at ``initial`` seconds and grows by ``factor``.

Example:
    >>> model = LatencyModel()
    >>> model.observe("k", 3.0)
    >>> 2.7 < next_poll_delay(model.expected("k"), elapsed=0.0, polls=0) < 3.5
    True
"""

from __future__ import annotations

import random
import threading
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field


class RequestState(str, Enum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


class RequestStatus(BaseModel):
    """One status poll. A failed or cancelled request is COMPLETED with ``error`` set."""

    state: RequestState
    queue_position: int | None = None
    logs: list[dict[str, Any]] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None

    @property
    def done(self) -> bool:
        return self.state is RequestState.COMPLETED

    @classmethod
    def from_fal(cls, status: Any) -> RequestStatus:
        """Convert a ``fal_client`` ``Queued``/``InProgress``/``Completed`` object."""
        name = type(status).__name__
        logs = list(getattr(status, "logs", None) or [])
        if name == "Queued":
            return cls(state=RequestState.IN_QUEUE, queue_position=status.position)
        if name == "InProgress":
            return cls(state=RequestState.IN_PROGRESS, logs=logs)
        return cls(
            state=RequestState.COMPLETED,
            logs=logs,
            metrics=dict(getattr(status, "metrics", None) or {}),
            error=getattr(status, "error", None),
            error_type=getattr(status, "error_type", None),
        )


def observed_duration(last_pending: float | None, completed_seen: float) -> float:
    """Best estimate of when a request completed, from what the polls saw (seconds since submit).

    Completion happened between the last poll that saw it pending and the first that saw it done:
    take a point three quarters of the way up (polling a little late costs less than polling
    early, which costs an extra call and then the wait before the next one). Without a pending
    poll only the upper bound is known, and it sits above the true time by the poll margin and
    jitter (~3%); shading it by 6% keeps the estimate from creeping later request after request,
    so now and then a poll comes early and brackets the true time again.
    """
    if last_pending is None:
        return 0.94 * completed_seen
    return last_pending + 0.75 * (completed_seen - last_pending)


class LatencyModel:
    """Thread-safe moving average of request durations, per key."""

    def __init__(self, alpha: float = 0.5) -> None:
        self._alpha = alpha
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}

    def observe(self, key: str, seconds: float) -> None:
        if seconds <= 0:
            return
        with self._lock:
            old = self._values.get(key)
            if old is None or not 0.5 <= seconds / old <= 2.0:
                self._values[key] = seconds  # first sight, or the regime changed: start over
            else:
                self._values[key] = old + self._alpha * (seconds - old)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def expected(self, key: str) -> float | None:
        with self._lock:
            return self._values.get(key)


#: Shared by every wait in the process, so a batch learns from its first requests.
LATENCY = LatencyModel()


def next_poll_delay(
    expected: float | None,
    *,
    elapsed: float,
    polls: int,
    queue_position: int | None = None,
    initial: float = 0.5,
    factor: float = 1.3,
    max_delay: float = 10.0,
    jitter: float = 0.1,
) -> float:
    """Seconds to sleep before the next status call.

    ``expected`` is the learned duration of such a request (None when unknown), ``elapsed`` the
    time since submit, ``polls`` the status calls made so far for this request.
    """
    if expected is None:
        delay = initial * factor**polls
    elif elapsed < expected:
        # aim just past the expected completion; jitter only ever later, never early. Not capped
        # by max_delay: that bounds backoff, while a poll before the expected end is wasted
        delay = expected - elapsed + 0.02 * expected
        return delay * random.uniform(1.0, 1.0 + jitter / 4)
    else:  # overdue: look again soon, then back off
        delay = max(0.03 * expected, 0.05) * factor ** max(0, polls - 1)
    if queue_position:
        base = expected if expected is not None else initial
        delay = max(delay, base * min(queue_position, 4) / 2)
    delay = min(delay, max_delay)
    return max(0.02, delay * random.uniform(1 - jitter, 1 + jitter))
