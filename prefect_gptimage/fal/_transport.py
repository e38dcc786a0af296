"""The transport under the client layer's httpx clients: every failure becomes a package error.

fal_client 1.0.3 retries every request itself (10 attempts), submit included, on transport errors,
408/409/429 and ingress 502/503/504 (fal-protocol §2.4), also in the methods of its request
handles, which the client layer drives for status and cancel. This transport sits outermost
(:mod:`prefect_gptimage.fal._connect`) and turns each failed exchange into an exception of this
package, which is not an ``httpx.HTTPError``, so fal_client's retry loop lets it through
untouched: the one layer that retries is the client core (:mod:`prefect_gptimage.fal._core`),
under the :class:`~prefect_gptimage.retry.RetryPolicy`.

The verdicts come from :mod:`prefect_gptimage.retry`. For a submit (the only billable call) a
failure after the request may have reached fal's queue (a read error or dropped connection after
the body went out, an ingress 502/504) is :class:`~prefect_gptimage.errors.SubmitOutcomeUnknown`:
never resent, because the queue API has no idempotency key. One class serves both the sync and the
async client.

Every body is read here, whole, under :class:`BodyLimits`: at most ``max_bytes`` (checked against
``Content-Length`` before reading, then while reading, after content decoding, so a gzip bomb
stops at the limit too) and within ``timeout`` seconds in all (httpx's own timeout is per read, so
a body trickled a few bytes at a time would otherwise never end). A success body over the limit is
a permanent :class:`~prefect_gptimage.errors.PermanentFalError` (never retried, never cached); a
body too slow is transient (retried under the retry budget), or for a submit, an unknown outcome.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from typing import cast

import httpx
from pydantic import BaseModel, ConfigDict, Field

from prefect_gptimage.errors import GptImageError, PermanentFalError, TransientFalError
from prefect_gptimage.retry import (
    NOT_SENT,
    UNKNOWN_SUBMIT_CODES,
    fal_response_error,
    fal_transport_error,
    is_ingress,
    submit_outcome_unknown,
)
from prefect_gptimage.schemas import DEFAULT_MAX_BODY_BYTES

#: Default total time to read one body (after its headers arrived).
DEFAULT_BODY_TIMEOUT = 120.0
#: Error bodies are only read for their message: a smaller cap.
MAX_ERROR_BODY_BYTES = 1024 * 1024


class BodyLimits(BaseModel):
    """How much of a queue answer's body is read, and for how long.

    Example:
        >>> BodyLimits().max_bytes // 2**20, BodyLimits().timeout
        (36, 120.0)
    """

    model_config = ConfigDict(frozen=True)

    max_bytes: int = Field(
        default=DEFAULT_MAX_BODY_BYTES, gt=0, description="Largest body read (after decoding)."
    )
    timeout: float = Field(
        default=DEFAULT_BODY_TIMEOUT, gt=0, description="Seconds one body may take to arrive."
    )


class _TooBig(Exception):
    pass


class _TooSlow(Exception):
    def __init__(self, received: int, elapsed: float) -> None:
        super().__init__(f"{received} bytes in {elapsed:.0f}s")


class _Reader:
    """Collects one body's chunks against a byte cap and a total deadline."""

    def __init__(self, response: httpx.Response, limit: int, timeout: float) -> None:
        declared = response.headers.get("content-length", "")
        if (
            declared.isdigit()
            and int(declared) > limit
            and "content-encoding" not in {k.lower() for k in response.headers}
        ):
            raise _TooBig
        self.limit, self.timeout = limit, timeout
        self.started = time.monotonic()
        self.chunks: list[bytes] = []
        self.received = 0

    def add(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.limit:
            raise _TooBig
        self.chunks.append(chunk)
        elapsed = time.monotonic() - self.started
        if elapsed > self.timeout:
            raise _TooSlow(self.received, elapsed)

    def response(self, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        """The same answer with its (decoded) body in memory."""
        headers = [
            (k, v)
            for k, v in response.headers.multi_items()
            if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        return httpx.Response(
            response.status_code,
            headers=headers,
            content=b"".join(self.chunks),
            request=request,
            extensions=response.extensions,
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


def _too_big(request: httpx.Request, response: httpx.Response, limit: int) -> GptImageError:
    operation = operation_of(request)
    if response.status_code >= 400:  # the error itself matters, not its oversized text
        return fal_response_error(
            httpx.Response(response.status_code, headers=response.headers, request=request),
            operation,
        )
    message = (
        f"fal {operation} at {request.url.host}: the answer is over the {limit}-byte limit "
        "(PREFECT_GPTIMAGE_MAX_RESULT_BYTES); not read"
    )
    if operation == "submit":
        return submit_outcome_unknown(request.url.path.lstrip("/"), "an oversized answer")
    return PermanentFalError(message, status_code=response.status_code)


def _too_slow(request: httpx.Request, exc: _TooSlow, timeout: float) -> GptImageError:
    operation = operation_of(request)
    if operation == "submit":
        return submit_outcome_unknown(request.url.path.lstrip("/"), f"answer too slow ({exc})")
    return TransientFalError(
        f"fal {operation} at {request.url.host}: body too slow ({exc}, over the {timeout:.0f}s "
        "limit, PREFECT_GPTIMAGE_BODY_TIMEOUT)"
    )


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


class _Exchange:
    """One request's answer, read under the limits; every failure leaves as this package's error.

    Used as a context manager by both of :class:`FalTransport`'s shells, which only do the I/O.
    """

    def __init__(self, request: httpx.Request, limits: BodyLimits) -> None:
        self.request, self.limits = request, limits
        self.limit = limits.max_bytes
        self.reader: _Reader | None = None
        self.response = httpx.Response(0)

    def __enter__(self) -> _Exchange:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, _TooBig):
            raise _too_big(self.request, self.response, self.limit) from None
        if isinstance(exc, _TooSlow):
            raise _too_slow(self.request, exc, self.limits.timeout) from None
        if isinstance(exc, httpx.TransportError):
            raise _failed(self.request, exc) from None

    def start(self, response: httpx.Response) -> httpx.Response:
        """The answer's head arrived: check its declared size; returns it to read from."""
        self.response = response
        if response.status_code >= 400:
            self.limit = min(self.limit, MAX_ERROR_BODY_BYTES)
        self.reader = _Reader(response, self.limit, self.limits.timeout)
        return response

    def read(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            self.add(chunk)

    def add(self, chunk: bytes) -> None:
        assert self.reader is not None
        self.reader.add(chunk)

    def result(self) -> httpx.Response:
        """The answer, its body in memory, or the error it stands for."""
        assert self.reader is not None
        return _checked(self.request, self.reader.response(self.request, self.response))


class FalTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Wraps fal_client's (sync or async) backup-domain transport; see the module docstring."""

    def __init__(
        self,
        inner: httpx.BaseTransport | httpx.AsyncBaseTransport,
        limits: BodyLimits | None = None,
    ) -> None:
        self._inner = inner
        self.limits = limits or BodyLimits()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with _Exchange(request, self.limits) as exchange:
            answer = cast(httpx.BaseTransport, self._inner).handle_request(request)
            with contextlib.closing(answer):
                exchange.read(exchange.start(answer).iter_bytes())
        return exchange.result()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        inner = cast(httpx.AsyncBaseTransport, self._inner)
        with _Exchange(request, self.limits) as exchange:
            answer = await inner.handle_async_request(request)
            async with contextlib.aclosing(answer):
                async for chunk in exchange.start(answer).aiter_bytes():
                    exchange.add(chunk)
        return exchange.result()

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
