"""``AsyncFalQueueClient``: :class:`~prefect_gptimage.fal.client.FalQueueClient` for asyncio.

The same core (:mod:`prefect_gptimage.fal._core`), retry policy and submit guard; only the I/O is
performed on an ``httpx.AsyncClient`` and fal_client's ``AsyncRequestHandle``. Method for method
the same API, awaited.

Example (it talks to fal, so it is not run as a doctest)::

    client = AsyncFalQueueClient()
    handle = await client.submit(GptImageRequest(prompt="a red kite", quality="low"))
    await client.wait(handle)
    (await client.result(handle)).images
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

import fal_client
import httpx

from prefect_gptimage.fal import _core
from prefect_gptimage.fal._connect import async_http
from prefect_gptimage.fal._ops import Io, aoutcome
from prefect_gptimage.fal._transport import BodyLimits
from prefect_gptimage.fal.client import Log
from prefect_gptimage.fal.hosts import queue_base
from prefect_gptimage.fal.polling import RequestStatus
from prefect_gptimage.retry import RetryPolicy
from prefect_gptimage.schemas import AnyRequest, GptImageOutput, RequestHandle

__all__ = ["AsyncFalQueueClient"]

T = TypeVar("T")


class AsyncFalQueueClient(_core.Shell):
    """Asynchronous client for fal's queue; see :class:`FalQueueClient` for each method.

    Its connection pool belongs to the event loop that first used it: use one instance per loop.
    """

    def __init__(
        self,
        key: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        limits: BodyLimits | None = None,
    ) -> None:
        super().__init__(key, retry=retry, limits=limits)
        self._http: httpx.AsyncClient | None = None
        self._http_lock: asyncio.Lock | None = None

    async def _connect(self) -> httpx.AsyncClient:
        if self._http_lock is None:
            self._http_lock = asyncio.Lock()
        async with self._http_lock:
            if self._http is None:
                self._http = await async_http(self._key, self.limits)
            return self._http

    async def _run(self, steps: _core.Steps[T]) -> T:
        try:
            http = await self._connect()
        except Exception as exc:
            raise _core.setup_error(exc) from None
        io = Io(http, fal_client.AsyncRequestHandle, asyncio.sleep, queue_base())
        driver = _core.Driver(steps)
        while driver.pending:
            driver.feed(await aoutcome(driver.op.run(io)))
        return driver.result  # type: ignore[return-value]

    async def submit(
        self,
        request: AnyRequest,
        *,
        start_timeout: float | None = None,
        headers: dict[str, str] | None = None,
        webhook_url: str | None = None,
    ) -> RequestHandle:
        return await self._run(
            _core.submit(
                request,
                self.retry,
                start_timeout=start_timeout,
                headers=headers,
                webhook_url=webhook_url,
            )
        )

    async def status(self, handle: RequestHandle, *, with_logs: bool = False) -> RequestStatus:
        return await self._run(_core.status(handle, self.retry, with_logs))

    async def wait(
        self, handle: RequestHandle, *, timeout: float | None = None, log: Log | None = None
    ) -> RequestStatus:
        return await self._run(_core.wait(handle, self.retry, timeout, log))

    async def result(self, handle: RequestHandle) -> GptImageOutput:
        return await self._run(_core.result(handle, self.retry))

    async def cancel(self, handle: RequestHandle, *, quiet: bool = False) -> bool:
        return await self._run(_core.cancel(handle, self.retry, quiet))

    async def run(
        self, request: AnyRequest, *, timeout: float | None = None
    ) -> tuple[RequestHandle, GptImageOutput]:
        return await self._run(_core.run(request, self.retry, timeout))
