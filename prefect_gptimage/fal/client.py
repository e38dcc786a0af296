"""``FalQueueClient``: fal's queue (submit, status, wait, result, cancel) over the unmodified
fal_client, synchronously. The logic is :mod:`prefect_gptimage.fal._core`, shared with
:class:`~prefect_gptimage.fal.async_client.AsyncFalQueueClient`; this class only performs its I/O.

Retries, in one place: every call retries its transient failures under one
:class:`~prefect_gptimage.retry.RetryPolicy` (backoff with jitter, ``budget`` seconds in all);
fal_client's own retry loop never fires (see :mod:`prefect_gptimage.fal._connect`). A submit is
resent only when it provably never reached fal's queue; an ambiguous one raises
:class:`~prefect_gptimage.errors.SubmitOutcomeUnknown`.

Example (it talks to fal, so it is not run as a doctest)::

    client = FalQueueClient()                               # FAL_KEY from the environment
    handle = client.submit(GptImageRequest(prompt="a red kite", quality="low"))
    client.wait(handle)                                     # polls adaptively
    client.result(handle).images[0].url
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any, TypeVar

import fal_client
import httpx

from prefect_gptimage.fal import _core
from prefect_gptimage.fal._connect import sync_http
from prefect_gptimage.fal._ops import Io, outcome
from prefect_gptimage.fal._transport import BodyLimits
from prefect_gptimage.fal.hosts import queue_base
from prefect_gptimage.fal.polling import RequestStatus
from prefect_gptimage.retry import RetryPolicy
from prefect_gptimage.schemas import AnyRequest, GptImageOutput, RequestHandle

__all__ = ["BodyLimits", "FalQueueClient", "RetryPolicy"]

T = TypeVar("T")
Log = logging.Logger | logging.LoggerAdapter[Any]


def key_id(key: str | None) -> str:
    """A digest of an API key, to tell clients apart without keeping the key in a dict key."""
    return hashlib.sha256((key or "").encode()).hexdigest()


class FalQueueClient(_core.Shell):
    """Synchronous client for fal's queue, for one API key (``None``: fal_client's env chain).

    Instances are cheap to share between threads: the connection pool is reused. ``limits``
    bounds every answer's body (size and total read time; see :class:`BodyLimits`).
    """

    _instances: dict[tuple[str, RetryPolicy, BodyLimits], FalQueueClient] = {}
    _lock = threading.Lock()

    @classmethod
    def shared(
        cls,
        key: str | None = None,
        retry: RetryPolicy | None = None,
        limits: BodyLimits | None = None,
    ) -> FalQueueClient:
        """A process-wide instance per key, policy and limits, so tasks reuse connections."""
        policy, bounds = retry or RetryPolicy(), limits or BodyLimits()
        ident = (key_id(key), policy, bounds)
        with cls._lock:
            if ident not in cls._instances:
                cls._instances[ident] = cls(key, retry=policy, limits=bounds)
            return cls._instances[ident]

    def __init__(
        self,
        key: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        limits: BodyLimits | None = None,
    ) -> None:
        super().__init__(key, retry=retry, limits=limits)
        self._http: httpx.Client | None = None
        self._http_lock = threading.Lock()

    def _connect(self) -> httpx.Client:
        with self._http_lock:
            if self._http is None:
                self._http = sync_http(self._key, self.limits)
            return self._http

    def _run(self, steps: _core.Steps[T]) -> T:
        try:
            http = self._connect()
        except Exception as exc:
            raise _core.setup_error(exc) from None
        io = Io(http, fal_client.SyncRequestHandle, time.sleep, queue_base())
        driver = _core.Driver(steps)
        while driver.pending:
            driver.feed(outcome(lambda: driver.op.run(io)))
        return driver.result  # type: ignore[return-value]

    def submit(
        self,
        request: AnyRequest,
        *,
        start_timeout: float | None = None,
        headers: dict[str, str] | None = None,
        webhook_url: str | None = None,
    ) -> RequestHandle:
        """Submit ``request`` (billable). Never re-sends a submit fal may have accepted."""
        return self._run(
            _core.submit(
                request,
                self.retry,
                start_timeout=start_timeout,
                headers=headers,
                webhook_url=webhook_url,
            )
        )

    def status(self, handle: RequestHandle, *, with_logs: bool = False) -> RequestStatus:
        """One status call (idempotent, retried on transient failures)."""
        return self._run(_core.status(handle, self.retry, with_logs))

    def wait(
        self, handle: RequestHandle, *, timeout: float | None = None, log: Log | None = None
    ) -> RequestStatus:
        """Poll until the request completes; forward fal's logs and queue position to ``log``.

        After ``timeout`` seconds (None: ``DEFAULT_REQUEST_TIMEOUT``, 600) the request is
        cancelled and :class:`FalRequestTimeout` raised.
        A request that completed with an error raises :class:`FalRequestFailed`.
        """
        return self._run(_core.wait(handle, self.retry, timeout, log))

    def result(self, handle: RequestHandle) -> GptImageOutput:
        """Fetch the output of a completed request (one GET; no extra status poll)."""
        return self._run(_core.result(handle, self.retry))

    def cancel(self, handle: RequestHandle, *, quiet: bool = False) -> bool:
        """Ask fal to cancel. True if cancellation was requested, False if it had already ended."""
        return self._run(_core.cancel(handle, self.retry, quiet))

    def run(
        self, request: AnyRequest, *, timeout: float | None = None
    ) -> tuple[RequestHandle, GptImageOutput]:
        """Submit, wait and fetch in one call (no caching: see the Prefect tasks for that)."""
        return self._run(_core.run(request, self.retry, timeout))
