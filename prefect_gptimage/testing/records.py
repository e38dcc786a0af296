"""The emulated fal queue's records: how a request fails, its state, and the snapshots tests read.

:class:`EmulatedRequest` is the mutable state :class:`~prefect_gptimage.testing.state.QueueModel`
keeps per request; :class:`RequestInfo` and :class:`EmulatorStats` are the frozen snapshots
``FalEmulator.request(id)`` and ``FalEmulator.stats`` return; :class:`Failure` is how a failed
request ends (status fields and the answer its result URL gives).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from prefect_gptimage.testing.faults import error_type_for

__all__ = [
    "CANCELLED",
    "COMPLETED",
    "IN_PROGRESS",
    "IN_QUEUE",
    "START_TIMEOUT",
    "EmulatedRequest",
    "EmulatorStats",
    "Failure",
    "RequestInfo",
]

IN_QUEUE, IN_PROGRESS, COMPLETED = "IN_QUEUE", "IN_PROGRESS", "COMPLETED"


@dataclass(frozen=True)
class Failure:
    """How a failed request ends: its status fields and the answer its result URL gives."""

    status_code: int
    error: str
    error_type: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def server(cls, status_code: int, detail: str, error_type: str | None = None) -> Failure:
        """fal's flat infrastructure error: ``{"detail": str, "error_type": str}``."""
        etype = error_type or error_type_for(status_code)
        return cls(
            status_code,
            detail,
            etype,
            {"detail": detail, "error_type": etype},
            {"X-Fal-Error-Type": etype},
        )

    @classmethod
    def validation(cls, loc_field: str, msg: str, error_type: str) -> Failure:
        """fal's model error: a 422 with a ``detail`` array (fal-protocol §1.7)."""
        item = {
            "loc": ["body", loc_field],
            "msg": msg,
            "type": error_type,
            "url": f"https://docs.fal.ai/errors#{error_type}",
        }
        return cls(422, msg, error_type, {"detail": [item]}, {"X-Fal-Retryable": "false"})


CANCELLED = Failure.server(499, "Request cancelled", "client_cancelled")
START_TIMEOUT = Failure(
    504,
    "Request timed out before it started",
    "request_timeout",
    {"detail": "Request timed out before it started", "error_type": "request_timeout"},
    {"X-Fal-Error-Type": "request_timeout", "X-Fal-Request-Timeout-Type": "user"},
)


@dataclass(eq=False)
class EmulatedRequest:
    """Internal, mutable state of one accepted request (guarded by the model's lock)."""

    request_id: str
    endpoint: str
    app: str
    arguments: dict[str, Any]
    submitted_at: float
    deadline: float | None = None
    planned_failure: Failure | None = None
    input_check: Future[Failure | None] | None = None
    qseq: int = 0
    status: str = IN_QUEUE
    started_at: float | None = None
    ends_at: float | None = None
    completed_at: float | None = None
    outcome: Failure | None = None
    misspell_rate: float = 0.0  # of the quoted text drawn into its images (fixed at submit)
    ordinal: int = 0  # identical inputs accepted before this one
    inputs_read: list[tuple[str, str]] = field(default_factory=list)  # (field, sha256) fetched
    headers: dict[str, str] = field(default_factory=dict)  # the submit's X-Fal-* headers

    @property
    def prompt(self) -> str:
        return str(self.arguments.get("prompt", ""))

    @property
    def num_images(self) -> int:
        return int(self.arguments.get("num_images", 1))


@dataclass(frozen=True)
class RequestInfo:
    """A snapshot of one request, as returned by ``FalEmulator.request(id)``.

    Times are Unix timestamps. ``error``/``error_type``/``status_code`` describe a failed
    request (``status_code`` is what its result URL answers: 200 on success).
    ``input_sha256``: ``(field, sha256)`` of each input image an edit's check fetched so far
    (``image_urls`` in order, then ``mask_image_url``); ``headers``: the submit's ``X-Fal-*``
    headers (names lower-cased), e.g. ``x-fal-store-io``.
    """

    request_id: str
    endpoint: str
    arguments: dict[str, Any]
    status: str
    queue_position: int | None
    submitted_at: float
    started_at: float | None
    completed_at: float | None
    error: str | None
    error_type: str | None
    status_code: int | None
    input_sha256: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def succeeded(self) -> bool:
        return self.status == COMPLETED and self.error is None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class EmulatorStats:
    """A snapshot of the emulator's counters (``emu.stats``; ``GET /_emulator/stats``).

    Attribute and item access both work: ``stats.submit == stats["submit"]``.

    ``submit``..``media`` count calls per operation (all of them, also failed or faulted ones).
    ``accepted`` counts requests enqueued; each ends in exactly one of ``completed`` (succeeded),
    ``failed`` (an error, incl. start timeouts) or ``cancelled``. ``submits_by_input`` counts
    accepted submissions per normalized input (canonical JSON incl. the endpoint), and
    ``duplicate_submits`` is the sum over inputs of (count - 1).
    """

    submit: int
    status: int
    status_stream: int
    result: int
    cancel: int
    media: int
    submits_by_endpoint: dict[str, int]
    submits_by_input: dict[str, int]
    duplicate_submits: int
    accepted: int
    completed: int
    failed: int
    cancelled: int
    in_queue: int
    in_progress: int
    max_in_progress: int
    faults_fired: int
    faults_by_kind: dict[str, int]
    unauthorized: int
    internal_errors: int

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
