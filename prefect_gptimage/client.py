"""The fal client layer: submit, status, wait, result and cancel over the unmodified fal_client.

:class:`FalQueueClient` (sync) and :class:`AsyncFalQueueClient` (async) wrap ``fal_client``'s own
``SyncClient``/``AsyncClient``. Only one thing differs from a stock fal_client: the httpx
transport under it is wrapped by :mod:`prefect_gptimage._transport`, so that a submit is never
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

import asyncio
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import fal_client
import httpx
import tenacity
from asyncstdlib import cached_property as async_cached_property
from fal_client.client import USER_AGENT, AsyncBackupDomainTransport, BackupDomainTransport
from pydantic import BaseModel, ConfigDict

from prefect_gptimage._transport import AsyncSubmitGuardTransport, SubmitGuardTransport
from prefect_gptimage.classify import classify, detail_text, from_http_response
from prefect_gptimage.errors import (
    FalError,
    FalRequestFailed,
    FalRequestTimeout,
    GptImageError,
    PermanentFalError,
    TransientFalError,
    is_transient,
)
from prefect_gptimage.polling import LATENCY, RequestStatus, next_poll_delay, observed_duration
from prefect_gptimage.schemas import AnyRequest, GptImageOutput, RequestHandle

logger = logging.getLogger("prefect_gptimage.client")

#: Timeouts for status, result and cancel (as fal_client's own QUEUE_POLL_TIMEOUT).
POLL_TIMEOUT = httpx.Timeout(120.0, connect=30.0)


class RetryPolicy(BaseModel):
    """How idempotent calls (status, result, cancel, download) retry transient failures."""

    model_config = ConfigDict(frozen=True)

    attempts: int = 6
    initial_delay: float = 0.25
    max_delay: float = 8.0

    def _kwargs(self) -> dict[str, Any]:
        return {
            "retry": tenacity.retry_if_exception(is_transient),
            "stop": tenacity.stop_after_attempt(self.attempts),
            "wait": tenacity.wait_exponential(multiplier=self.initial_delay, max=self.max_delay)
            + tenacity.wait_random(0, self.initial_delay),
            "reraise": True,
            "before_sleep": _log_retry,
        }

    def retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(**self._kwargs())

    def async_retrying(self) -> tenacity.AsyncRetrying:
        return tenacity.AsyncRetrying(**self._kwargs())


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    logger.warning("retrying after transient failure (attempt %d): %s", state.attempt_number, exc)


@dataclass(frozen=True)
class _GuardedSyncClient(fal_client.SyncClient):
    """fal_client's SyncClient with the submit guard around its transport."""

    @cached_property
    def _client(self) -> httpx.Client:
        return httpx.Client(
            transport=SubmitGuardTransport(BackupDomainTransport()),
            headers={"Authorization": self._auth.header_value, "User-Agent": USER_AGENT},
            timeout=self.default_timeout,
            follow_redirects=True,
        )


@dataclass(unsafe_hash=True)
class _GuardedAsyncClient(fal_client.AsyncClient):
    """fal_client's AsyncClient with the submit guard around its transport."""

    @async_cached_property(asyncio.Lock)
    async def _client(self) -> httpx.AsyncClient:
        auth = await self._auth
        return httpx.AsyncClient(
            transport=AsyncSubmitGuardTransport(AsyncBackupDomainTransport()),
            headers={"Authorization": auth.header_value, "User-Agent": USER_AGENT},
            timeout=self.default_timeout,
        )


def _handle_from_fal(endpoint: str, fal_handle: Any, profile: str | None) -> RequestHandle:
    return RequestHandle(
        endpoint=endpoint,
        request_id=fal_handle.request_id,
        status_url=fal_handle.status_url,
        response_url=fal_handle.response_url,
        cancel_url=fal_handle.cancel_url,
        submitted_at=time.time(),
        profile=profile,
    )


def _parse_output(response: httpx.Response, handle: RequestHandle) -> GptImageOutput:
    if response.status_code == 202:
        raise TransientFalError(
            f"result of {handle.request_id} is not ready yet", request_id=handle.request_id
        )
    try:
        return GptImageOutput.model_validate(response.json())
    except ValueError as exc:
        raise PermanentFalError(
            f"fal returned an output that does not match the GPT Image schema: {exc}",
            request_id=handle.request_id,
        ) from None


def _error_response(response: httpx.Response, handle: RequestHandle, operation: str) -> FalError:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return from_http_response(
        response.status_code,
        response.headers,
        body,
        operation=operation,
        request_id=handle.request_id,
    )


def _adoption_candidate(request: AnyRequest, error: GptImageError) -> RequestHandle | None:
    """After a submit answered 5xx *with* a request id, the handle to check fal's queue for."""
    if not (isinstance(error, FalError) and error.request_id and (error.status_code or 0) >= 500):
        return None
    return RequestHandle(
        endpoint=request.endpoint,
        request_id=error.request_id,
        profile=request.profile,
        submitted_at=time.time(),
    )


def _log_adopted(error: GptImageError, handle: RequestHandle) -> RequestHandle:
    code = getattr(error, "status_code", None)
    logger.warning("submit answered %s but fal enqueued %s: resuming it", code, handle.request_id)
    return handle


def _cancel_failed(handle: RequestHandle, exc: GptImageError, quiet: bool) -> bool:
    """Outcome of a cancel that raised: False if already completed (or ``quiet``), else raise."""
    if isinstance(exc, PermanentFalError) and exc.status_code == 400:
        return False
    if not quiet:
        raise exc
    logger.warning("cancel of %s failed: %s", handle.request_id, exc)
    return False


def _failed(
    status: RequestStatus, handle: RequestHandle, result_error: FalError | None
) -> FalRequestFailed:
    """The request ended with an error: fal's own message, and the result's status code."""
    text = status.error or (result_error.message if result_error else "unknown error")
    if result_error is not None and result_error.detail:
        text = detail_text(result_error.detail)
    error_type = status.error_type or (result_error.error_type if result_error else None)
    label = f" ({error_type})" if error_type else ""
    return FalRequestFailed(
        f"fal request {handle.request_id} failed{label}: {text}",
        status_code=result_error.status_code if result_error else None,
        error_type=error_type,
        request_id=handle.request_id,
        detail=result_error.detail if result_error else status.error,
    )


class _WaitTracker:
    """Logging and pacing state of one wait, shared by the sync and async loops."""

    def __init__(
        self,
        handle: RequestHandle,
        timeout: float | None,
        log: logging.Logger | logging.LoggerAdapter[Any],
    ) -> None:
        self.handle = handle
        self.log = log
        self.started = time.monotonic()
        self.deadline = None if timeout is None else self.started + timeout
        self.submitted = handle.submitted_at or time.time()
        self.polls = 0
        self.logs_seen = 0
        self.position: int | None = None
        self.last_pending: float | None = None
        self.queued = False
        # learn only from waits that watched the request from its submit on
        self.learning = bool(handle.profile) and time.time() - self.submitted < 2.0

    def update(self, status: RequestStatus) -> None:
        self.polls += 1
        if status.queue_position is not None and status.queue_position != self.position:
            self.log.info(
                "fal request %s is queued at position %d",
                self.handle.request_id,
                status.queue_position,
            )
        self.position = status.queue_position
        for entry in status.logs[self.logs_seen :]:
            self.log.info("fal [%s] %s", entry.get("level", "INFO"), entry.get("message", ""))
        self.logs_seen = max(self.logs_seen, len(status.logs))
        elapsed = time.time() - self.submitted
        self.queued = self.queued or status.queue_position is not None
        if not status.done:
            self.last_pending = elapsed
        elif self.learning and not status.error and not self.queued and self.handle.profile:
            LATENCY.observe(self.handle.profile, observed_duration(self.last_pending, elapsed))

    def timed_out(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def delay(self) -> float:
        expected = LATENCY.expected(self.handle.profile) if self.handle.profile else None
        d = next_poll_delay(
            expected,
            elapsed=time.time() - self.submitted,
            polls=self.polls,
            queue_position=self.position,
        )
        if self.deadline is not None:
            d = min(d, max(0.0, self.deadline - time.monotonic()))
        return d

    def timeout_error(self) -> FalRequestTimeout:
        waited = time.monotonic() - self.started
        return FalRequestTimeout(
            f"fal request {self.handle.request_id} did not complete within {waited:.1f}s; "
            "it was cancelled",
            request_id=self.handle.request_id,
        )


def _key_id(key: str | None) -> str:
    return hashlib.sha256((key or "").encode()).hexdigest()


class FalQueueClient:
    """Synchronous client for fal's queue, for one API key (``None``: fal_client's env chain).

    Instances are cheap to share between threads: the connection pool is reused.
    """

    _instances: dict[tuple[str, RetryPolicy], FalQueueClient] = {}
    _lock = threading.Lock()

    def __init__(self, key: str | None = None, *, retry: RetryPolicy | None = None) -> None:
        self._fal = _GuardedSyncClient(key=key)
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
            candidate = _adoption_candidate(request, error)
            if candidate is None:
                raise error from None
            try:
                self.status(candidate)
            except GptImageError:
                raise error from None
            return _log_adopted(error, candidate)
        return _handle_from_fal(request.endpoint, fal_handle, request.profile)

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
        track = _WaitTracker(handle, timeout, log or logger)
        while True:
            status = self.status(handle, with_logs=True)
            track.update(status)
            if status.done:
                if status.error:
                    raise _failed(status, handle, self._result_error(handle))
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
                raise _error_response(response, handle, "result")
            return _parse_output(response, handle)

        return self._call("result", handle, get)  # type: ignore[no-any-return]

    def cancel(self, handle: RequestHandle, *, quiet: bool = False) -> bool:
        """Ask fal to cancel. True if cancellation was requested, False if it had already ended."""
        fh = self._fal_handle(handle)
        try:
            self._call("cancel", handle, fh.cancel)
        except GptImageError as exc:
            return _cancel_failed(handle, exc, quiet)
        return True

    def run(
        self, request: AnyRequest, *, timeout: float | None = None
    ) -> tuple[RequestHandle, GptImageOutput]:
        """Submit, wait and fetch in one call (no caching: see the Prefect tasks for that)."""
        handle = self.submit(request)
        self.wait(handle, timeout=timeout)
        return handle, self.result(handle)


class AsyncFalQueueClient:
    """Asynchronous twin of :class:`FalQueueClient`, over ``fal_client.AsyncClient``."""

    def __init__(self, key: str | None = None, *, retry: RetryPolicy | None = None) -> None:
        self._fal = _GuardedAsyncClient(key=key)
        self.retry = retry or RetryPolicy()

    async def _fal_handle(self, handle: RequestHandle) -> Any:
        http = await self._fal._client
        if handle.status_url and handle.response_url and handle.cancel_url:
            return fal_client.AsyncRequestHandle(
                request_id=handle.request_id,
                response_url=handle.response_url,
                status_url=handle.status_url,
                cancel_url=handle.cancel_url,
                client=http,
            )
        return await self._fal.get_handle(handle.endpoint, handle.request_id)

    async def _call(self, operation: str, handle: RequestHandle | None, fn: Any) -> Any:
        rid = handle.request_id if handle else None
        async for attempt in self.retry.async_retrying():
            with attempt:
                try:
                    return await fn()
                except GptImageError:
                    raise
                except Exception as exc:
                    raise classify(exc, operation=operation, request_id=rid) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def submit(
        self, request: AnyRequest, *, start_timeout: float | None = None
    ) -> RequestHandle:
        """Submit ``request`` (billable); same no-double-pay rules as the sync client."""
        try:
            fh = await self._fal.submit(
                request.endpoint, request.to_arguments(), start_timeout=start_timeout
            )
        except GptImageError:
            raise
        except Exception as exc:
            error = classify(exc, operation="submit")
            candidate = _adoption_candidate(request, error)
            if candidate is None:
                raise error from None
            try:
                await self.status(candidate)
            except GptImageError:
                raise error from None
            return _log_adopted(error, candidate)
        return _handle_from_fal(request.endpoint, fh, request.profile)

    async def status(self, handle: RequestHandle, *, with_logs: bool = False) -> RequestStatus:
        fh = await self._fal_handle(handle)
        return RequestStatus.from_fal(
            await self._call("status", handle, lambda: fh.status(with_logs=with_logs))
        )

    async def wait(
        self,
        handle: RequestHandle,
        *,
        timeout: float | None = None,
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> RequestStatus:
        track = _WaitTracker(handle, timeout, log or logger)
        while True:
            status = await self.status(handle, with_logs=True)
            track.update(status)
            if status.done:
                if status.error:
                    error: FalError | None = None
                    try:
                        await self.result(handle)
                    except FalError as exc:
                        error = exc
                    raise _failed(status, handle, error)
                return status
            if track.timed_out():
                await self.cancel(handle, quiet=True)
                raise track.timeout_error()
            await asyncio.sleep(track.delay())

    async def result(self, handle: RequestHandle) -> GptImageOutput:
        fh = await self._fal_handle(handle)
        http = await self._fal._client

        async def get() -> GptImageOutput:
            response = await http.get(fh.response_url, timeout=POLL_TIMEOUT)
            if response.status_code >= 400:
                raise _error_response(response, handle, "result")
            return _parse_output(response, handle)

        return await self._call("result", handle, get)  # type: ignore[no-any-return]

    async def cancel(self, handle: RequestHandle, *, quiet: bool = False) -> bool:
        fh = await self._fal_handle(handle)
        try:
            await self._call("cancel", handle, fh.cancel)
        except GptImageError as exc:
            return _cancel_failed(handle, exc, quiet)
        return True
