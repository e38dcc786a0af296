"""``AsyncFalQueueClient``: the asyncio twin of :class:`~prefect_gptimage.client.FalQueueClient`,
with the same submit guard and retry rules (see that module).

Example:
    >>> client = AsyncFalQueueClient()
    >>> handle = await client.submit(GptImageRequest(prompt="a red kite", quality="low"))
    >>> await client.wait(handle)
    >>> (await client.result(handle)).images
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import fal_client

from prefect_gptimage.errors import (
    FalError,
    GptImageError,
)
from prefect_gptimage.fal._classify import classify
from prefect_gptimage.fal._queue import (
    POLL_TIMEOUT,
    GuardedAsyncClient,
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


class AsyncFalQueueClient:
    """Asynchronous twin of :class:`FalQueueClient`, over ``fal_client.AsyncClient``."""

    def __init__(self, key: str | None = None, *, retry: RetryPolicy | None = None) -> None:
        self._fal = GuardedAsyncClient(key=key)
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
            candidate = adoption_candidate(request, error)
            if candidate is None:
                raise error from None
            try:
                await self.status(candidate)
            except GptImageError:
                raise error from None
            return log_adopted(error, candidate)
        return handle_from_fal(request.endpoint, fh, request.profile)

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
        track = WaitTracker(handle, timeout, log or logger)
        if track.learning:  # just submitted: nothing to see before it can have finished
            await asyncio.sleep(track.delay())
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
                    raise request_failed(status, handle, error)
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
                raise error_response(response, handle, "result")
            return parse_output(response, handle)

        return await self._call("result", handle, get)  # type: ignore[no-any-return]

    async def cancel(self, handle: RequestHandle, *, quiet: bool = False) -> bool:
        fh = await self._fal_handle(handle)
        try:
            await self._call("cancel", handle, fh.cancel)
        except GptImageError as exc:
            return cancel_failed(handle, exc, quiet)
        return True
