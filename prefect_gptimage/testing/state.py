"""The emulated fal queue: FIFO order, an account concurrency limit, timing, counters.

fal counts only IN_PROGRESS requests against the concurrency limit; extra submissions wait in the
queue, never rejected (fal-protocol §5). :class:`QueueModel` reproduces this exactly: the state
is advanced lazily to "now" on every access (and by a scheduler thread, so waiters wake on time),
processing completions and start deadlines in chronological order. A slot freed at time *t*
starts the next queued request at *t*, not when someone next looks. Queue positions come from a
Fenwick tree, so each status poll is O(log n) even with thousands of queued requests.

All methods whose name ends in ``_locked`` must be called with :attr:`QueueModel.cond` held.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import Counter, deque
from datetime import datetime, timezone
from typing import Any

# the records are defined in their own module (the names stay importable from here)
from prefect_gptimage.testing.records import (
    CANCELLED,
    COMPLETED,
    IN_PROGRESS,
    IN_QUEUE,
    START_TIMEOUT,
    EmulatedRequest,
    EmulatorStats,
    Failure,
    RequestInfo,
)

OPERATIONS = ("submit", "status", "status_stream", "result", "cancel", "media")

# A completion whose input-image check is still running is retried this much later.
_DEFER = 0.01


class _Fenwick:
    """Counts of queued requests by queue sequence number; prefix sums in O(log n)."""

    def __init__(self, size: int = 1024) -> None:
        self._n = size
        self._tree = [0] * (size + 1)
        self._vals = [0] * (size + 1)

    def add(self, i: int, delta: int) -> None:
        if i > self._n:
            self._grow(i)
        self._vals[i] += delta
        while i <= self._n:
            self._tree[i] += delta
            i += i & -i

    def prefix(self, i: int) -> int:
        i = min(i, self._n)
        total = 0
        while i > 0:
            total += self._tree[i]
            i -= i & -i
        return total

    def _grow(self, need: int) -> None:
        n = self._n
        while n < need:
            n *= 2
        vals = self._vals + [0] * (n - self._n)
        tree = list(vals)
        for i in range(1, n + 1):
            parent = i + (i & -i)
            if parent <= n:
                tree[parent] += tree[i]
        self._n, self._vals, self._tree = n, vals, tree


class QueueModel:
    """FIFO queue + concurrency limit + counters. See the module docs."""

    def __init__(self, latency: float, concurrency_limit: int) -> None:
        if latency < 0:
            raise ValueError("latency must be >= 0")
        if concurrency_limit < 1:
            raise ValueError("concurrency_limit must be >= 1")
        self.cond = threading.Condition(threading.Lock())
        self.latency = latency
        self.concurrency_limit = concurrency_limit
        self.stopped = False
        self._wall_offset = time.time() - time.monotonic()
        self._clear_locked()

    # -- bookkeeping -------------------------------------------------------------------------

    def _clear_locked(self) -> None:
        self.requests: dict[str, EmulatedRequest] = {}
        self._queue: deque[EmulatedRequest] = deque()
        self._positions = _Fenwick()
        self._qseq = itertools.count(1)
        self._heap_seq = itertools.count()
        self._running: set[str] = set()
        self._ends: list[tuple[float, int, str]] = []
        self._deadlines: list[tuple[float, int, str]] = []
        self._clock = time.monotonic()
        self.calls: Counter[str] = Counter()
        self.submits_by_endpoint: Counter[str] = Counter()
        self.submits_by_input: Counter[str] = Counter()
        self.accepted = self.completed = self.failed = self.cancelled = 0
        self.max_in_progress = self.unauthorized = self.internal_errors = 0

    def reset_locked(self) -> None:
        self._clear_locked()
        self.cond.notify_all()

    def wall(self, t: float | None) -> float | None:
        """Monotonic time → Unix time."""
        return None if t is None else t + self._wall_offset

    def iso(self, t: float) -> str:
        return datetime.fromtimestamp(t + self._wall_offset, tz=timezone.utc).isoformat()

    # -- time --------------------------------------------------------------------------------

    def advance_locked(self, now: float) -> None:
        """Apply every start, completion and start timeout due at or before ``now``, in order."""
        changed = self._fill_locked(self._clock)
        while True:
            t_end = self._peek_end_locked()
            t_deadline = self._peek_deadline_locked()
            t = min(t_end, t_deadline)
            if t > now:
                break
            self._clock = max(self._clock, t)
            if t_end <= t_deadline:
                _, _, rid = heapq.heappop(self._ends)
                self._finish_locked(self.requests[rid], t)
            else:
                _, _, rid = heapq.heappop(self._deadlines)
                self._end_queued_locked(self.requests[rid], t, START_TIMEOUT)
            changed = True
            self._fill_locked(t)
        self._clock = max(self._clock, now)
        if changed:
            self.cond.notify_all()

    def next_event_locked(self) -> float | None:
        t = min(self._peek_end_locked(), self._peek_deadline_locked())
        return None if t == float("inf") else t

    def _peek_end_locked(self) -> float:
        while self._ends:
            t, _, rid = self._ends[0]
            req = self.requests.get(rid)
            if req is not None and req.status == IN_PROGRESS and req.ends_at == t:
                return t
            heapq.heappop(self._ends)
        return float("inf")

    def _peek_deadline_locked(self) -> float:
        while self._deadlines:
            t, _, rid = self._deadlines[0]
            req = self.requests.get(rid)
            if req is not None and req.status == IN_QUEUE:
                return t
            heapq.heappop(self._deadlines)
        return float("inf")

    def _fill_locked(self, t: float) -> bool:
        started = False
        while len(self._running) < self.concurrency_limit and self._queue:
            req = self._queue.popleft()
            if req.status != IN_QUEUE:
                continue
            self._positions.add(req.qseq, -1)
            req.status, req.started_at, req.ends_at = IN_PROGRESS, t, t + self.latency
            self._running.add(req.request_id)
            heapq.heappush(self._ends, (req.ends_at, next(self._heap_seq), req.request_id))
            self.max_in_progress = max(self.max_in_progress, len(self._running))
            started = True
        return started

    def _finish_locked(self, req: EmulatedRequest, t: float) -> None:
        check = req.input_check
        if check is not None and not check.done():
            req.ends_at = t + _DEFER
            heapq.heappush(self._ends, (req.ends_at, next(self._heap_seq), req.request_id))
            return
        outcome = check.result() if check is not None else None
        self._complete_locked(req, t, outcome or req.planned_failure)

    def _complete_locked(self, req: EmulatedRequest, t: float, outcome: Failure | None) -> None:
        self._running.discard(req.request_id)
        req.status, req.completed_at, req.outcome = COMPLETED, t, outcome
        if outcome is None:
            self.completed += 1
        elif outcome is CANCELLED:
            self.cancelled += 1
        else:
            self.failed += 1

    def _end_queued_locked(self, req: EmulatedRequest, t: float, outcome: Failure) -> None:
        self._positions.add(req.qseq, -1)
        self._complete_locked(req, t, outcome)

    # -- operations --------------------------------------------------------------------------

    def submit_locked(self, req: EmulatedRequest, normalized: str, now: float) -> int:
        """Enqueue ``req``; returns its queue position (requests ahead of it)."""
        self.advance_locked(now)
        req.qseq = next(self._qseq)
        self.requests[req.request_id] = req
        self._queue.append(req)
        self._positions.add(req.qseq, 1)
        position = self._positions.prefix(req.qseq - 1)
        if req.deadline is not None:
            heapq.heappush(self._deadlines, (req.deadline, next(self._heap_seq), req.request_id))
        self.accepted += 1
        self.submits_by_endpoint[req.endpoint] += 1
        req.ordinal = self.submits_by_input[normalized]
        self.submits_by_input[normalized] += 1
        self._fill_locked(now)
        self.cond.notify_all()
        return position

    def cancel_locked(self, req: EmulatedRequest, now: float) -> bool:
        """Cancel; False when the request had already completed."""
        self.advance_locked(now)
        if req.status == COMPLETED:
            return False
        if req.status == IN_QUEUE:
            self._end_queued_locked(req, now, CANCELLED)
        else:
            self._complete_locked(req, now, CANCELLED)
            self._fill_locked(now)
        self.cond.notify_all()
        return True

    def configure_locked(
        self, now: float, latency: float | None = None, concurrency_limit: int | None = None
    ) -> None:
        self.advance_locked(now)
        if latency is not None:
            if latency < 0:
                raise ValueError("latency must be >= 0")
            self.latency = float(latency)
        if concurrency_limit is not None:
            if int(concurrency_limit) < 1:
                raise ValueError("concurrency_limit must be >= 1")
            self.concurrency_limit = int(concurrency_limit)
            self._fill_locked(now)
        self.cond.notify_all()

    def position_locked(self, req: EmulatedRequest) -> int | None:
        return self._positions.prefix(req.qseq - 1) if req.status == IN_QUEUE else None

    # -- views -------------------------------------------------------------------------------

    def logs_locked(self, req: EmulatedRequest, now: float) -> list[dict[str, Any]]:
        """Log lines a runner would have printed by ``now``."""

        def line(t: float, message: str, level: str = "INFO") -> dict[str, Any]:
            return {"message": message, "level": level, "source": "USER", "timestamp": self.iso(t)}

        if req.started_at is None:
            return []
        args = req.arguments
        end = req.completed_at if req.completed_at is not None else now
        out = [
            line(
                req.started_at,
                f"Starting generation: quality={args.get('quality')}, "
                f"size={args.get('image_size')}, format={args.get('output_format')}",
            )
        ]
        n = req.num_images
        span = (req.ends_at or req.started_at) - req.started_at
        for k in range(n):
            t = req.started_at + span * k / n
            if t <= end:
                out.append(line(t, f"Generating image {k + 1}/{n}"))
        if req.completed_at is not None:
            if req.outcome is None:
                out.append(line(req.completed_at, f"Generated {n} image(s)"))
            else:
                out.append(line(req.completed_at, req.outcome.error, "ERROR"))
        return out

    def next_log_time_locked(self, req: EmulatedRequest, now: float) -> float | None:
        """When the next progress log line of an in-progress request appears."""
        if req.status != IN_PROGRESS or req.started_at is None or req.ends_at is None:
            return None
        n = req.num_images
        span = req.ends_at - req.started_at
        for k in range(n):
            t = req.started_at + span * k / n
            if t > now:
                return t
        return None

    def status_body_locked(
        self, req: EmulatedRequest, base: str, with_logs: bool, now: float
    ) -> dict[str, Any]:
        url = f"{base}/{req.app}/requests/{req.request_id}"
        body: dict[str, Any] = {
            "status": req.status,
            "request_id": req.request_id,
            "response_url": url,
            "status_url": url + "/status",
            "cancel_url": url + "/cancel",
            "logs": self.logs_locked(req, now) if with_logs else None,
        }
        if req.status == IN_QUEUE:
            body["queue_position"] = self.position_locked(req)
        elif req.status == COMPLETED:
            inference = None
            if req.started_at is not None and req.completed_at is not None:
                inference = round(req.completed_at - req.started_at, 6)
            body["metrics"] = {"inference_time": inference}
            if req.outcome is not None:
                body["error"] = req.outcome.error
                body["error_type"] = req.outcome.error_type
        return body

    def info_locked(self, req: EmulatedRequest) -> RequestInfo:
        outcome = req.outcome
        return RequestInfo(
            request_id=req.request_id,
            endpoint=req.endpoint,
            arguments=dict(req.arguments),
            status=req.status,
            queue_position=self.position_locked(req),
            submitted_at=req.submitted_at + self._wall_offset,
            started_at=self.wall(req.started_at),
            completed_at=self.wall(req.completed_at),
            error=outcome.error if outcome else None,
            error_type=outcome.error_type if outcome else None,
            status_code=(outcome.status_code if outcome else 200)
            if req.status == COMPLETED
            else None,
            input_sha256=tuple(req.inputs_read),
            headers=tuple(sorted(req.headers.items())),
        )

    def stats_locked(self, faults_fired: int, faults_by_kind: dict[str, int]) -> EmulatorStats:
        in_queue = sum(1 for r in self._queue if r.status == IN_QUEUE)
        return EmulatorStats(
            **{op: self.calls[op] for op in OPERATIONS},
            submits_by_endpoint=dict(self.submits_by_endpoint),
            submits_by_input=dict(self.submits_by_input),
            duplicate_submits=sum(c - 1 for c in self.submits_by_input.values()),
            accepted=self.accepted,
            completed=self.completed,
            failed=self.failed,
            cancelled=self.cancelled,
            in_queue=in_queue,
            in_progress=len(self._running),
            max_in_progress=self.max_in_progress,
            faults_fired=faults_fired,
            faults_by_kind=faults_by_kind,
            unauthorized=self.unauthorized,
            internal_errors=self.internal_errors,
        )

    # -- scheduler ---------------------------------------------------------------------------

    def run_scheduler(self) -> None:
        """Thread body: advance the model at each event time until :attr:`stopped`."""
        with self.cond:
            while not self.stopped:
                now = time.monotonic()
                self.advance_locked(now)
                nxt = self.next_event_locked()
                self.cond.wait(None if nxt is None else max(0.0, nxt - time.monotonic()))
