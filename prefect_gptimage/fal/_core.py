"""One implementation of fal's queue protocol, driven by a sync or an async shell.

The logic of submit (and adopting a request fal enqueued despite an error answer), status, wait,
result and cancel is written once, as generators that *yield* the I/O they need (an :class:`Op`)
and receive its outcome. :class:`FalQueueClient` and :class:`AsyncFalQueueClient` are shells that
perform each op with fal_client's sync or async client (:class:`Io`) and feed the outcome back.

Retries live here, once: :func:`retried` drives a tenacity policy (backoff with jitter within a
time budget) without sleeping itself: it yields :class:`Sleep`, which the shell performs.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import httpx
import tenacity

from prefect_gptimage.errors import (
    FalError,
    GptImageError,
    PermanentFalError,
    SubmitOutcomeUnknown,
    TransientFalError,
)
from prefect_gptimage.fal._classify import classify
from prefect_gptimage.fal._transport import BodyLimits
from prefect_gptimage.fal._wait import WaitTracker, request_failed
from prefect_gptimage.fal.polling import RequestStatus
from prefect_gptimage.retry import RetryPolicy
from prefect_gptimage.schemas import AnyRequest, GptImageOutput, RequestHandle

logger = logging.getLogger("prefect_gptimage.client")

T = TypeVar("T")
#: A piece of client logic: yields ops, receives their outcomes, returns a T.
Steps = Generator["Op", Any, T]

POLL_TIMEOUT = httpx.Timeout(120.0, connect=30.0)


@dataclass(frozen=True)
class Io:
    """What a shell lends the core: fal_client's client, its httpx client, handles, sleep."""

    fal: Any
    http: Any
    handle_class: Any
    sleep: Callable[[float], Any]
    queue_host: str = ""

    def handle(self, handle: RequestHandle) -> Any:
        """fal_client's handle for ``handle``: the URLs fal returned, else built from the id.

        Returned URLs are followed only on the queue host (``FAL_QUEUE_RUN_HOST``): every call
        carries the key, which must never go to a host a reply merely named.
        """
        urls = (handle.status_url, handle.response_url, handle.cancel_url)
        if all(urls) and all(_on_host(u, self.queue_host) for u in urls):
            return self.handle_class(
                request_id=handle.request_id,
                response_url=handle.response_url,
                status_url=handle.status_url,
                cancel_url=handle.cancel_url,
                client=self.http,
            )
        return self.handle_class.from_request_id(self.http, handle.endpoint, handle.request_id)


def _on_host(url: str | None, host: str) -> bool:
    if not url:
        return False
    try:
        return not host or httpx.URL(url).host == host
    except httpx.InvalidURL:
        return False


@dataclass(frozen=True)
class Op:
    """One exchange with fal. ``run`` returns its value (sync shell) or an awaitable (async)."""

    name: str = field(init=False, default="")

    def run(self, io: Io) -> Any:  # pragma: no cover - every op overrides it
        raise NotImplementedError


@dataclass(frozen=True)
class Submit(Op):
    request: AnyRequest
    start_timeout: float | None = None
    headers: tuple[tuple[str, str], ...] = ()
    name: str = field(init=False, default="submit")

    def run(self, io: Io) -> Any:
        return io.fal.submit(
            self.request.endpoint,
            self.request.to_arguments(),
            headers=dict(self.headers),
            start_timeout=self.start_timeout,
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


def queue_host() -> str:
    """The host of fal's queue as fal_client was configured at import (``FAL_QUEUE_RUN_HOST``)."""
    import fal_client.client  # deferred: it reads its hosts from the environment at import

    return httpx.URL(fal_client.client.QUEUE_URL_FORMAT).host


class Shell:
    """What both clients share: fal_client's client for one key, the retry policy, the bounds."""

    fal_class: ClassVar[Callable[..., Any]]

    def __init__(
        self,
        key: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        limits: BodyLimits | None = None,
    ) -> None:
        self._fal = self.fal_class(key=key, limits=limits or BodyLimits())
        self.retry = retry or RetryPolicy()


class Driver(Generic[T]):
    """Steps a piece of client logic: hands out its next op, feeds back each outcome."""

    def __init__(self, steps: Steps[T]) -> None:
        self._steps = steps
        self.pending = True
        self.result: T | None = None
        self.op: Op = Sleep(0.0)
        self._advance(lambda: next(steps))

    def feed(self, done: Outcome) -> None:
        if done.error is None:
            self._advance(lambda: self._steps.send(done.value))
        else:
            error = classify(done.error, operation=self.op.name, request_id=_request_id(self.op))
            self._advance(lambda: self._steps.throw(error))

    def _advance(self, step: Callable[[], Op]) -> None:
        try:
            self.op = step()
        except StopIteration as finished:
            self.pending = False
            self.result = finished.value


def _request_id(op: Op) -> str | None:
    handle = getattr(op, "handle", None)
    return handle.request_id if isinstance(handle, RequestHandle) else None


def setup_error(exc: Exception) -> GptImageError:
    """A failure while the shell builds its connection (e.g. no credentials), classified."""
    return classify(exc, operation="connect")


def call(op: Op) -> Steps[Any]:
    """One op, no retry."""
    return (yield op)


def retried(policy: RetryPolicy, attempt: Callable[[], Steps[T]]) -> Steps[T]:
    """Run ``attempt`` under ``policy``: tenacity decides, the shell sleeps (:class:`Sleep`)."""
    retrying = policy.retrying()
    retrying.begin()
    state = tenacity.RetryCallState(retrying, fn=None, args=(), kwargs={})
    while True:
        do = retrying.iter(state)
        if isinstance(do, tenacity.DoAttempt):
            try:
                state.set_result((yield from attempt()))
            except GptImageError:
                state.set_exception(sys.exc_info())  # type: ignore[arg-type]
        elif isinstance(do, tenacity.DoSleep):
            state.prepare_for_next_attempt()
            yield Sleep(float(do))
        else:
            return do  # type: ignore[no-any-return]


# --- the protocol -------------------------------------------------------------------------------


def submit(
    request: AnyRequest,
    policy: RetryPolicy,
    *,
    start_timeout: float | None = None,
    headers: dict[str, str] | None = None,
) -> Steps[RequestHandle]:
    """Submit (billable), resending only what provably never reached fal's queue."""
    op = Submit(request, start_timeout, tuple((headers or {}).items()))

    def attempt() -> Steps[RequestHandle]:
        try:
            fal_handle = yield op
        except FalError as error:
            return (yield from _adopt(request, error))
        return RequestHandle(
            endpoint=request.endpoint,
            request_id=fal_handle.request_id,
            status_url=fal_handle.status_url,
            response_url=fal_handle.response_url,
            cancel_url=fal_handle.cancel_url,
            submitted_at=time.time(),
            profile=request.profile,
        )

    return (yield from retried(policy, attempt))


def _adopt(request: AnyRequest, error: FalError) -> Steps[RequestHandle]:
    """After a submit answered 5xx *with* a request id: resume that request if fal enqueued it.

    If fal does not know the id, nothing was enqueued and ``error`` (transient) may be resent; if
    fal cannot say, the outcome is unknown and nothing is resent.
    """
    if not (error.request_id and (error.status_code or 0) >= 500):
        raise error
    candidate = RequestHandle(
        endpoint=request.endpoint,
        request_id=error.request_id,
        profile=request.profile,
        submitted_at=time.time(),
    )
    try:
        yield Status(candidate)
    except PermanentFalError as check:
        if check.status_code == 404:
            raise error from None
        raise SubmitOutcomeUnknown(f"{error.message}; fal could not confirm it: {check}") from None
    except GptImageError as check:
        raise SubmitOutcomeUnknown(f"{error.message}; fal could not confirm it: {check}") from None
    logger.warning(
        "submit answered %s but fal enqueued %s: resuming it", error.status_code, error.request_id
    )
    return candidate


def status(
    handle: RequestHandle, policy: RetryPolicy, with_logs: bool = False
) -> Steps[RequestStatus]:
    """One status call (retried on transient failures)."""
    raw = yield from retried(policy, lambda: call(Status(handle, with_logs)))
    return RequestStatus.from_fal(raw)


def _fetch(handle: RequestHandle) -> Steps[GptImageOutput]:
    response: httpx.Response = yield Result(handle)
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


def result(handle: RequestHandle, policy: RetryPolicy) -> Steps[GptImageOutput]:
    """The output of a completed request (one GET, retried; no extra status poll)."""
    return (yield from retried(policy, lambda: _fetch(handle)))


def cancel(handle: RequestHandle, policy: RetryPolicy, quiet: bool = False) -> Steps[bool]:
    """Ask fal to cancel: True if requested, False if it had already ended (or ``quiet``)."""
    try:
        yield from retried(policy, lambda: call(Cancel(handle)))
    except GptImageError as exc:
        if isinstance(exc, PermanentFalError) and exc.status_code == 400:
            return False
        if not quiet:
            raise
        logger.warning("cancel of %s failed: %s", handle.request_id, exc)
        return False
    return True


def wait(
    handle: RequestHandle,
    policy: RetryPolicy,
    timeout: float | None = None,
    log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
) -> Steps[RequestStatus]:
    """Poll until the request completes; after ``timeout`` s (None: ``DEFAULT_REQUEST_TIMEOUT``)
    cancel it and raise :class:`~prefect_gptimage.errors.FalRequestTimeout`."""
    track = WaitTracker(handle, timeout, log or logger)
    if track.learning:  # just submitted: nothing to see before it can have finished
        yield Sleep(track.delay())
    while True:
        current = yield from status(handle, policy, with_logs=True)
        track.update(current)
        if current.done:
            if current.error:
                raise request_failed(current, handle, (yield from _result_error(handle)))
            return current
        if track.timed_out():
            yield from cancel(handle, policy, quiet=True)
            raise track.timeout_error()
        yield Sleep(track.delay())


def _result_error(handle: RequestHandle) -> Steps[FalError | None]:
    """A failed request's result is its error: one GET, no retry."""
    try:
        yield from _fetch(handle)
    except FalError as exc:
        return exc
    return None


def run(
    request: AnyRequest, policy: RetryPolicy, timeout: float | None = None
) -> Steps[tuple[RequestHandle, GptImageOutput]]:
    """Submit, wait and fetch."""
    handle = yield from submit(request, policy)
    yield from wait(handle, policy, timeout)
    return handle, (yield from result(handle, policy))
