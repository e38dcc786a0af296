"""httpx transports that keep fal_client from paying twice for one submit.

fal_client 1.0.3 retries *every* request, submit included, on transport errors, timeouts,
408/409/429
and ingress-style 502/503/504 (fal-protocol §2.4). For status, result and cancel that is harmless.
For submit, the only billable call, a retry after fal already accepted the request would enqueue
(and bill) a second, identical request: the queue API has no idempotency key.

These transports sit outermost on fal_client's own httpx client and look only at submits (POSTs).
They let through, for fal_client to retry, only the failures where the request provably never
reached fal's queue:

- connect errors and connect/pool timeouts (nothing was sent);
- 408, 409 and 429 answers (fal rejected the request);
- ingress-style 503 (nginx had no upstream for it).

Anything else that leaves the outcome unknown (a read error or read timeout after the body went
out, a dropped connection, an ingress-style 502/504, which mean the upstream may have taken the
request) is turned into :class:`~prefect_gptimage.errors.SubmitOutcomeUnknown`. That exception is
not an ``httpx.HTTPError``, so fal_client's retry loop does not catch it and it reaches the caller
as is, never retried.
"""

from __future__ import annotations

import httpx

from prefect_gptimage.errors import SubmitOutcomeUnknown

_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
)
_UNKNOWN_OUTCOME_CODES = (502, 504)


def _is_submit(request: httpx.Request) -> bool:
    return request.method == "POST"


def _unknown(request: httpx.Request, what: str) -> SubmitOutcomeUnknown:
    return SubmitOutcomeUnknown(
        f"submit to {request.url.path.lstrip('/')} got no usable answer ({what}); fal may have "
        "accepted and billed it, so it is not retried. Check fal's dashboard, or run again with "
        "refresh_cache=True to submit anew.",
    )


def _check_response(request: httpx.Request, response: httpx.Response) -> None:
    if (
        response.status_code in _UNKNOWN_OUTCOME_CODES
        and "x-fal-request-id" not in response.headers
    ):
        raise _unknown(request, f"ingress {response.status_code}")


class SubmitGuardTransport(httpx.BaseTransport):
    """Sync transport wrapper: see the module docstring."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not _is_submit(request):
            return self._inner.handle_request(request)
        try:
            response = self._inner.handle_request(request)
        except _NOT_SENT:
            raise
        except httpx.TransportError as exc:
            raise _unknown(request, type(exc).__name__) from None
        if response.status_code in _UNKNOWN_OUTCOME_CODES:
            response.read()
            _check_response(request, response)
        return response

    def close(self) -> None:
        self._inner.close()


class AsyncSubmitGuardTransport(httpx.AsyncBaseTransport):
    """Async twin of :class:`SubmitGuardTransport`."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not _is_submit(request):
            return await self._inner.handle_async_request(request)
        try:
            response = await self._inner.handle_async_request(request)
        except _NOT_SENT:
            raise
        except httpx.TransportError as exc:
            raise _unknown(request, type(exc).__name__) from None
        if response.status_code in _UNKNOWN_OUTCOME_CODES:
            await response.aread()
            _check_response(request, response)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
