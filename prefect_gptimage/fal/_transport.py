"""The transport under fal_client's httpx clients: every failure becomes a package error, at once.

fal_client 1.0.3 retries every request itself (10 attempts), submit included, on transport errors,
408/409/429 and ingress 502/503/504 (fal-protocol §2.4). This transport sits outermost and turns
each failed exchange into an exception of this package, which is not an ``httpx.HTTPError``, so
fal_client's retry loop lets it through untouched: the one layer that retries is the client core
(:mod:`prefect_gptimage.fal._core`), under the :class:`~prefect_gptimage.retry.RetryPolicy`.

The verdicts come from :mod:`prefect_gptimage.retry`. For a submit (the only billable call) a
failure after the request may have reached fal's queue (a read error or dropped connection after
the body went out, an ingress 502/504) is :class:`~prefect_gptimage.errors.SubmitOutcomeUnknown`:
never resent, because the queue API has no idempotency key. One class serves both the sync and the
async client.
"""

from __future__ import annotations

import logging

import httpx

from prefect_gptimage.errors import GptImageError
from prefect_gptimage.retry import (
    NOT_SENT,
    UNKNOWN_SUBMIT_CODES,
    fal_response_error,
    fal_transport_error,
    is_ingress,
    submit_outcome_unknown,
)


def operation_of(request: httpx.Request) -> str:
    """The queue operation a request performs: submit, status, cancel or result."""
    if request.method == "POST":
        return "submit"
    path = request.url.path
    return (
        "status" if path.endswith("/status") else "cancel" if path.endswith("/cancel") else "result"
    )


def _failed(request: httpx.Request, exc: httpx.TransportError) -> GptImageError:
    operation = operation_of(request)
    if operation == "submit" and not isinstance(exc, NOT_SENT):
        return submit_outcome_unknown(request.url.path.lstrip("/"), type(exc).__name__)
    return fal_transport_error(exc, operation, request.url.host)


def _checked(request: httpx.Request, response: httpx.Response) -> httpx.Response:
    if response.status_code < 400:
        return response
    operation = operation_of(request)
    if (
        operation == "submit"
        and response.status_code in UNKNOWN_SUBMIT_CODES
        and is_ingress(response)
    ):
        raise submit_outcome_unknown(
            request.url.path.lstrip("/"), f"ingress {response.status_code}"
        )
    raise fal_response_error(response, operation)


class FalTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Wraps fal_client's (sync or async) backup-domain transport; see the module docstring."""

    def __init__(self, inner: httpx.BaseTransport | httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(self._inner, httpx.BaseTransport)
        try:
            response = self._inner.handle_request(request)
        except httpx.TransportError as exc:
            raise _failed(request, exc) from None
        if response.status_code >= 400:
            response.read()
        return _checked(request, response)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(self._inner, httpx.AsyncBaseTransport)
        try:
            response = await self._inner.handle_async_request(request)
        except httpx.TransportError as exc:
            raise _failed(request, exc) from None
        if response.status_code >= 400:
            await response.aread()
        return _checked(request, response)

    def close(self) -> None:
        if isinstance(self._inner, httpx.BaseTransport):
            self._inner.close()

    async def aclose(self) -> None:
        if isinstance(self._inner, httpx.AsyncBaseTransport):
            await self._inner.aclose()


class _OncePerHost(logging.Filter):
    """fal_client warns on every attempt that it tries its backup domain: say it once per host."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if "trying backup domain" not in record.getMessage():
            return True
        host = str(record.args[0]) if isinstance(record.args, tuple) and record.args else ""
        if host in self._seen:
            return False
        self._seen.add(host)
        return True


logging.getLogger("fal_client.client").addFilter(_OncePerHost())
