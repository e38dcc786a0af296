"""Pieces shared by the sync and async queue clients: fal_client subclasses with the submit
guard, the retry policy, response parsing, and the bookkeeping of one wait."""

from __future__ import annotations

import asyncio
import logging
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

from prefect_gptimage.errors import (
    FalError,
    FalRequestFailed,
    FalRequestTimeout,
    GptImageError,
    PermanentFalError,
    TransientFalError,
    is_transient,
)
from prefect_gptimage.fal._classify import detail_text, from_http_response
from prefect_gptimage.fal._transport import AsyncSubmitGuardTransport, SubmitGuardTransport
from prefect_gptimage.fal.polling import LATENCY, RequestStatus, next_poll_delay, observed_duration
from prefect_gptimage.schemas import AnyRequest, GptImageOutput, RequestHandle

logger = logging.getLogger("prefect_gptimage.fal.client")

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
class GuardedSyncClient(fal_client.SyncClient):
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
class GuardedAsyncClient(fal_client.AsyncClient):
    """fal_client's AsyncClient with the submit guard around its transport."""

    @async_cached_property(asyncio.Lock)
    async def _client(self) -> httpx.AsyncClient:
        auth = await self._auth
        return httpx.AsyncClient(
            transport=AsyncSubmitGuardTransport(AsyncBackupDomainTransport()),
            headers={"Authorization": auth.header_value, "User-Agent": USER_AGENT},
            timeout=self.default_timeout,
        )


def handle_from_fal(endpoint: str, fal_handle: Any, profile: str | None) -> RequestHandle:
    return RequestHandle(
        endpoint=endpoint,
        request_id=fal_handle.request_id,
        status_url=fal_handle.status_url,
        response_url=fal_handle.response_url,
        cancel_url=fal_handle.cancel_url,
        submitted_at=time.time(),
        profile=profile,
    )


def parse_output(response: httpx.Response, handle: RequestHandle) -> GptImageOutput:
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


def error_response(response: httpx.Response, handle: RequestHandle, operation: str) -> FalError:
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


def adoption_candidate(request: AnyRequest, error: GptImageError) -> RequestHandle | None:
    """After a submit answered 5xx *with* a request id, the handle to check fal's queue for."""
    if not (isinstance(error, FalError) and error.request_id and (error.status_code or 0) >= 500):
        return None
    return RequestHandle(
        endpoint=request.endpoint,
        request_id=error.request_id,
        profile=request.profile,
        submitted_at=time.time(),
    )


def log_adopted(error: GptImageError, handle: RequestHandle) -> RequestHandle:
    code = getattr(error, "status_code", None)
    logger.warning("submit answered %s but fal enqueued %s: resuming it", code, handle.request_id)
    return handle


def cancel_failed(handle: RequestHandle, exc: GptImageError, quiet: bool) -> bool:
    """Outcome of a cancel that raised: False if already completed (or ``quiet``), else raise."""
    if isinstance(exc, PermanentFalError) and exc.status_code == 400:
        return False
    if not quiet:
        raise exc
    logger.warning("cancel of %s failed: %s", handle.request_id, exc)
    return False


def request_failed(
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


class WaitTracker:
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
