"""The exchanges with fal's queue (:class:`Op`), and what a shell lends (:class:`Io`).

The client core (:mod:`prefect_gptimage.fal._core`) yields ops; the sync or async shell performs
each one on its httpx client and fal_client's public request handles, and feeds the outcome back.

Every call about a submitted request goes to URLs that :func:`queue_urls` chose: the ones fal
returned on submit only when they stay on the configured queue host and name this very request,
else the ones fal_client builds from the request id (which the handle has checked is a UUID).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from prefect_gptimage.errors import PermanentFalError
from prefect_gptimage.fal._connect import SUBMIT_TIMEOUT
from prefect_gptimage.fal.hosts import on_queue_host
from prefect_gptimage.schemas import AnyRequest, RequestHandle, check_request_id

POLL_TIMEOUT = httpx.Timeout(120.0, connect=30.0)


def queue_urls(handle: RequestHandle, base: httpx.URL) -> tuple[str, str, str] | None:
    """The (response, status, cancel) URLs fal returned for ``handle``, if they can be followed.

    They can when all three are on the queue host (:func:`.hosts.on_queue_host`) and are one
    request's URLs: ``<prefix>/requests/<request_id>``, the same with ``/status``
    and ``/cancel``. Otherwise None: every call carries the key, which must never go to a host
    a reply merely named, nor read another request's record.

    Example:
        >>> rid = "80e732af-660e-45cd-bd63-580e4f2a94cc"
        >>> h = RequestHandle(endpoint="fal-ai/gpt-image-1.5", request_id=rid,
        ...     response_url=f"https://queue.fal.run/fal-ai/gpt-image-1.5/requests/{rid}",
        ...     status_url=f"https://queue.fal.run/fal-ai/gpt-image-1.5/requests/{rid}/status",
        ...     cancel_url=f"https://queue.fal.run/fal-ai/gpt-image-1.5/requests/{rid}/cancel")
        >>> queue_urls(h, httpx.URL("https://queue.fal.run/")) is not None
        True
        >>> queue_urls(h, httpx.URL("https://localhost:8443/")) is None
        True
    """
    response, status, cancel = handle.response_url, handle.status_url, handle.cancel_url
    if not (response and status and cancel):
        return None
    if not all(on_queue_host(url, base) for url in (response, status, cancel)):
        return None
    tail = f"/requests/{handle.request_id}"
    if not response.endswith(tail) or (status, cancel) != (
        f"{response}/status",
        f"{response}/cancel",
    ):
        return None
    return response, status, cancel


@dataclass(frozen=True)
class Io:
    """What a shell lends the core: its httpx client, fal_client's handle class, its sleep, and
    the queue's base URL."""

    http: Any
    handle_class: Any
    sleep: Callable[[float], Any]
    base: httpx.URL

    def handle(self, handle: RequestHandle) -> Any:
        """fal_client's (public) request handle for ``handle``, over this shell's client.

        The request id is checked again here, at its use in a URL: a handle read back from a
        pickled record was never validated.
        """
        try:
            check_request_id(handle.request_id)
        except ValueError as exc:
            raise PermanentFalError(f"{exc}: not used in a URL") from None
        urls = queue_urls(handle, self.base)
        if urls is None:
            return self.handle_class.from_request_id(self.http, handle.endpoint, handle.request_id)
        response, status, cancel = urls
        return self.handle_class(
            request_id=handle.request_id,
            response_url=response,
            status_url=status,
            cancel_url=cancel,
            client=self.http,
        )


@dataclass(frozen=True)
class Op:
    """One exchange with fal. ``run`` returns its value (sync shell) or an awaitable (async)."""

    name: str = field(init=False, default="")

    def run(self, io: Io) -> Any:  # pragma: no cover - every op overrides it
        raise NotImplementedError


@dataclass(frozen=True)
class Submit(Op):
    """POST the request to the queue: the only billable call. Its value is fal's answer."""

    request: AnyRequest
    headers: tuple[tuple[str, str], ...] = ()
    webhook_url: str | None = None  # fal POSTs the outcome there (``?fal_webhook=``)
    name: str = field(init=False, default="submit")

    def run(self, io: Io) -> Any:
        return io.http.post(
            f"{io.base}{self.request.endpoint}",  # as fal_client builds it
            json=self.request.to_arguments(),
            headers=dict(self.headers),
            params={"fal_webhook": self.webhook_url} if self.webhook_url else None,
            timeout=SUBMIT_TIMEOUT,
        )


@dataclass(frozen=True)
class Status(Op):
    handle: RequestHandle
    with_logs: bool = False
    name: str = field(init=False, default="status")

    def run(self, io: Io) -> Any:
        return io.handle(self.handle).status(with_logs=self.with_logs)


@dataclass(frozen=True)
class Result(Op):
    handle: RequestHandle
    name: str = field(init=False, default="result")

    def run(self, io: Io) -> Any:
        return io.http.get(io.handle(self.handle).response_url, timeout=POLL_TIMEOUT)


@dataclass(frozen=True)
class Cancel(Op):
    handle: RequestHandle
    name: str = field(init=False, default="cancel")

    def run(self, io: Io) -> Any:
        return io.handle(self.handle).cancel()


@dataclass(frozen=True)
class Sleep(Op):
    seconds: float
    name: str = field(init=False, default="sleep")

    def run(self, io: Io) -> Any:
        return io.sleep(self.seconds)


@dataclass
class Outcome:
    """What performing an op gave: a value, or the exception it raised."""

    value: Any = None
    error: Exception | None = None


def outcome(fn: Callable[[], Any]) -> Outcome:
    """Perform a sync op."""
    try:
        return Outcome(fn())
    except Exception as exc:
        return Outcome(error=exc)


async def aoutcome(awaitable: Awaitable[Any]) -> Outcome:
    """Perform an async op."""
    try:
        return Outcome(await awaitable)
    except Exception as exc:
        return Outcome(error=exc)
