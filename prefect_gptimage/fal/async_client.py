"""``AsyncFalQueueClient``: :class:`~prefect_gptimage.fal.client.FalQueueClient` for asyncio.

The same core (:mod:`prefect_gptimage.fal._core`), retry policy and submit guard; only the I/O is
performed with fal_client's ``AsyncClient``. Method for method the same API, awaited.

Example (it talks to fal, so it is not run as a doctest)::

    client = AsyncFalQueueClient()
    handle = await client.submit(GptImageRequest(prompt="a red kite", quality="low"))
    await client.wait(handle)
    (await client.result(handle)).images
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TypeVar

import fal_client
import httpx
from asyncstdlib import cached_property as async_cached_property
from fal_client.client import USER_AGENT, AsyncBackupDomainTransport

from prefect_gptimage.fal import _core
from prefect_gptimage.fal._transport import BodyLimits, FalTransport
from prefect_gptimage.fal.client import Log
from prefect_gptimage.fal.polling import RequestStatus
from prefect_gptimage.schemas import AnyRequest, GptImageOutput, RequestHandle

__all__ = ["AsyncFalQueueClient"]

T = TypeVar("T")


@dataclass(unsafe_hash=True)
class _FalAsync(fal_client.AsyncClient):
    """fal_client's AsyncClient over :class:`FalTransport`."""

    limits: BodyLimits = field(default_factory=BodyLimits)

    @async_cached_property(asyncio.Lock)
    async def _client(self) -> httpx.AsyncClient:
        auth = await self._auth
        return httpx.AsyncClient(
            transport=FalTransport(AsyncBackupDomainTransport(), self.limits),
            headers={"Authorization": auth.header_value, "User-Agent": USER_AGENT},
            timeout=self.default_timeout,
            follow_redirects=True,
        )


class AsyncFalQueueClient(_core.Shell):
    """Asynchronous client for fal's queue; see :class:`FalQueueClient` for each method."""

    fal_class = _FalAsync

    async def _run(self, steps: _core.Steps[T]) -> T:
        try:
            http = await self._fal._client
        except Exception as exc:
            raise _core.setup_error(exc) from None
        io = _core.Io(
            self._fal, http, fal_client.AsyncRequestHandle, asyncio.sleep, _core.queue_host()
        )
        driver = _core.Driver(steps)
        while driver.pending:
            driver.feed(await _core.aoutcome(driver.op.run(io)))
        return driver.result  # type: ignore[return-value]

    async def submit(
        self,
        request: AnyRequest,
        *,
        start_timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> RequestHandle:
        return await self._run(
            _core.submit(request, self.retry, start_timeout=start_timeout, headers=headers)
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
