"""One fal request id, one row: which request of a run each fal request id belongs to.

fal could (in a bug, or a hostile proxy) return the same request id for two different submits.
Staging that result under both rows' names would label one image with two prompts, so a run keeps
a ledger and every row involved fails with :class:`~prefect_gptimage.errors.DuplicateRequestId`.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

from prefect_gptimage.errors import DuplicateRequestId
from prefect_gptimage.schemas import AnyRequest, request_fingerprint, shorten

__all__ = ["RequestIdLedger", "claim_request_id", "use_request_id_ledger"]


class RequestIdLedger:
    """Which request of a run each fal request id belongs to (thread-safe).

    A run that submits several different requests opens one ledger (:func:`use_request_id_ledger`)
    and each request claims its id (:func:`claim_request_id`) before its images are downloaded and
    staged. A second, different request claiming the same id fails, and the id is marked
    conflicted so that the run can fail the first claimant too (:meth:`conflicts`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owners: dict[str, tuple[str, str]] = {}
        self._conflicts: dict[str, list[str]] = {}

    def claim(self, request_id: str, request: AnyRequest, variant: int = 0) -> None:
        """Record that ``request`` got ``request_id``; raise :class:`DuplicateRequestId` if a
        different request of the run already did."""
        identity = request_fingerprint(request, variant)
        with self._lock:
            owner = self._owners.setdefault(request_id, (identity, request.prompt))
            if owner[0] == identity:
                return
            self._conflicts.setdefault(request_id, [owner[1]]).append(request.prompt)
        raise DuplicateRequestId(
            f"fal returned request id {request_id} for two different requests of this run "
            f"(prompts {shorten(owner[1])!r} and {shorten(request.prompt)!r}): its images are not "
            "staged under either name",
            request_id=request_id,
        )

    def conflicts(self) -> dict[str, list[str]]:
        """Request ids claimed by more than one request, with those requests' prompts."""
        with self._lock:
            return {rid: list(prompts) for rid, prompts in self._conflicts.items()}

    def conflicted(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._conflicts


_LEDGER: contextvars.ContextVar[RequestIdLedger | None] = contextvars.ContextVar(
    "prefect_gptimage_request_id_ledger", default=None
)


@contextlib.contextmanager
def use_request_id_ledger(ledger: RequestIdLedger) -> Iterator[RequestIdLedger]:
    """Within the block (and the tasks it submits: Prefect runs them in a copy of this context,
    which shares the ledger object), :func:`claim_request_id` records claims in ``ledger``."""
    token = _LEDGER.set(ledger)
    try:
        yield ledger
    finally:
        _LEDGER.reset(token)


def claim_request_id(request_id: str, request: AnyRequest, variant: int = 0) -> None:
    """Claim ``request_id`` for ``request`` in the run's ledger (no-op outside a ledger).

    Raises :class:`DuplicateRequestId` when another request of the run already holds it.
    """
    ledger = _LEDGER.get()
    if ledger is not None:
        ledger.claim(request_id, request, variant)
