"""The fal client layer: submit, status, wait, result and cancel over the unmodified fal_client.

:class:`FalQueueClient` (sync) and :class:`AsyncFalQueueClient` (async) wrap ``fal_client``'s own
``SyncClient``/``AsyncClient``. Only one thing differs from a stock fal_client: the httpx
transport under it is wrapped by :mod:`prefect_gptimage.fal._transport`, so that a submit is never
silently retried after fal may have accepted it.

Retries, in one place:

* **submit** (billable): fal_client retries connect failures, 408/409/429 and ingress 503 (nothing
  reached the queue). A 5xx that carries ``x-fal-request-id`` is checked against the queue: if
  that request exists it is adopted (no second submit), else it is a transient error. A read
  error, dropped connection or ingress 502/504 raises :class:`SubmitOutcomeUnknown`, never retried.
* **status, result, cancel** (idempotent): fal_client retries what it retries; on top, this layer
  retries every transient failure it leaves alone (500, json-style 502/503/504, exhausted 429s)
  with exponential backoff and jitter (tenacity), ``RetryPolicy`` attempts in all.

Example:
    >>> client = FalQueueClient()                               # FAL_KEY from the environment
    >>> handle = client.submit(GptImageRequest(prompt="a red kite", quality="low"))
    >>> client.wait(handle)                                     # polls adaptively
    >>> client.result(handle).images[0].url
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any

import fal_client
import httpx

from prefect_gptimage.errors import (
    FalError,
    GptImageError,
)
from prefect_gptimage.fal._classify import classify
from prefect_gptimage.fal._queue import (
    POLL_TIMEOUT,
    GuardedSyncClient,
    RetryPolicy,
    WaitTracker,
    adoption_candidate,
    cancel_failed,
    error_response,
    handle_from_fal,
    log_adopted,
    logger,
    parse_output,
    request_failed,
)
from prefect_gptimage.fal.polling import RequestStatus
from prefect_gptimage.schemas import AnyRequest, GptImageOutput, RequestHandle

__all__ = ["FalQueueClient", "RetryPolicy"]


def _key_id(key: str | None) -> str:
    return hashlib.sha256((key or "").encode()).hexdigest()


class FalQueueClient:
    """Synchronous client for fal's queue, for one API key (``None``: fal_client's env chain).

    Instances are cheap to share between threads: the connection pool is reused.
    """

    _instances: dict[tuple[str, RetryPolicy], FalQueueClient] = {}
    _lock = threading.Lock()

    def __init__(self, key: str | None = None, *, retry: RetryPolicy | None = None) -> None:
        self._fal = GuardedSyncClient(key=key)
        self.retry = retry or RetryPolicy()

    @classmethod
    def shared(cls, key: str | None = None, retry: RetryPolicy | None = None) -> FalQueueClient:
        """A process-wide instance per key, so tasks reuse connections."""
        policy = retry or RetryPolicy()
        ident = (_key_id(key), policy)
        with cls._lock:
            if ident not in cls._instances:
                cls._instances[ident] = cls(key, retry=policy)
            return cls._instances[ident]

    @property
    def _http(self) -> httpx.Client:
        return self._fal._client

    def _fal_handle(self, handle: RequestHandle) -> Any:
        if handle.status_url and handle.response_url and handle.cancel_url:
            return fal_client.SyncRequestHandle(
                request_id=handle.request_id,
                response_url=handle.response_url,
                status_url=handle.status_url,
                cancel_url=handle.cancel_url,
                client=self._http,
            )
        return self._fal.get_handle(handle.endpoint, handle.request_id)

    def _call(self, operation: str, handle: RequestHandle | None, fn: Any) -> Any:
        rid = handle.request_id if handle else None
        for attempt in self.retry.retrying():
            with attempt:
                try:
                    return fn()
                except GptImageError:
                    raise
                except Exception as exc:
                    raise classify(exc, operation=operation, request_id=rid) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def submit(
        self,
        request: AnyRequest,
        *,
        start_timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> RequestHandle:
        """Submit ``request`` (billable). Never re-sends a submit fal may have accepted."""
        try:
            fal_handle = self._fal.submit(
                request.endpoint,
                request.to_arguments(),
                headers=headers or {},
                start_timeout=start_timeout,
            )
        except GptImageError:
            raise
        except Exception as exc:
            error = classify(exc, operation="submit")
            candidate = adoption_candidate(request, error)
            if candidate is None:
                raise error from None
            try:
                self.status(candidate)
            except GptImageError:
                raise error from None
            return log_adopted(error, candidate)
        return handle_from_fal(request.endpoint, fal_handle, request.profile)

    def status(self, handle: RequestHandle, *, with_logs: bool = False) -> RequestStatus:
        """One status call (idempotent, retried on transient failures)."""
        fh = self._fal_handle(handle)
        return RequestStatus.from_fal(
            self._call("status", handle, lambda: fh.status(with_logs=with_logs))
        )

    def wait(
        self,
        handle: RequestHandle,
        *,
        timeout: float | None = None,
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> RequestStatus:
        """Poll until the request completes; forward fal's logs and queue position to ``log``.

        After ``timeout`` seconds the request is cancelled and :class:`FalRequestTimeout` raised.
        A request that completed with an error raises :class:`FalRequestFailed`.
        """
        track = WaitTracker(handle, timeout, log or logger)
        if track.learning:  # just submitted: nothing to see before it can have finished
            time.sleep(track.delay())
        while True:
            status = self.status(handle, with_logs=True)
            track.update(status)
            if status.done:
                if status.error:
                    raise request_failed(status, handle, self._result_error(handle))
                return status
            if track.timed_out():
                self.cancel(handle, quiet=True)
                raise track.timeout_error()
            time.sleep(track.delay())

    def _result_error(self, handle: RequestHandle) -> FalError | None:
        try:
            self.result(handle)
        except FalError as exc:
            return exc
        return None

    def result(self, handle: RequestHandle) -> GptImageOutput:
        """Fetch the output of a completed request (one GET; no extra status poll)."""
        url = self._fal_handle(handle).response_url

        def get() -> GptImageOutput:
            response = self._http.get(url, timeout=POLL_TIMEOUT)
            if response.status_code >= 400:
                raise error_response(response, handle, "result")
            return parse_output(response, handle)

        return self._call("result", handle, get)  # type: ignore[no-any-return]

    def cancel(self, handle: RequestHandle, *, quiet: bool = False) -> bool:
        """Ask fal to cancel. True if cancellation was requested, False if it had already ended."""
        fh = self._fal_handle(handle)
        try:
            self._call("cancel", handle, fh.cancel)
        except GptImageError as exc:
            return cancel_failed(handle, exc, quiet)
        return True

    def run(
        self, request: AnyRequest, *, timeout: float | None = None
    ) -> tuple[RequestHandle, GptImageOutput]:
        """Submit, wait and fetch in one call (no caching: see the Prefect tasks for that)."""
        handle = self.submit(request)
        self.wait(handle, timeout=timeout)
        return handle, self.result(handle)
