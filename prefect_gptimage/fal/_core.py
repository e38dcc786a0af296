"""One implementation of fal's queue protocol, driven by a sync or an async shell.

The logic of submit (and adopting a request fal enqueued despite an error answer), status, wait,
result and cancel is written once, as generators that *yield* the I/O they need (an
:class:`~prefect_gptimage.fal._ops.Op`) and receive its outcome. :class:`FalQueueClient` and
:class:`AsyncFalQueueClient` are shells that perform each op on their httpx client and fal_client's
public request handles (:mod:`prefect_gptimage.fal._connect`) and feed the outcome back.

Retries live here, once: :func:`retried` drives a tenacity policy (backoff with jitter within a
time budget) without sleeping itself: it yields :class:`Sleep`, which the shell performs.

fal's answers are checked before use: a submit's request id must be a fal request id
(:func:`~prefect_gptimage.schemas.check_request_id`, run by :class:`RequestHandle`), else the
request counts as paid with its outcome unknown, and the id is used nowhere.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

import httpx
import tenacity

from prefect_gptimage.errors import (
    FalError,
    GptImageError,
    InvalidRequestError,
    PermanentFalError,
    SubmitOutcomeUnknown,
    TransientFalError,
)
from prefect_gptimage.fal._classify import classify
from prefect_gptimage.fal._ops import Cancel, Op, Outcome, Result, Sleep, Status, Submit
from prefect_gptimage.fal._transport import BodyLimits
from prefect_gptimage.fal._wait import WaitTracker, request_failed
from prefect_gptimage.fal.polling import RequestStatus
from prefect_gptimage.retry import RetryPolicy, submit_outcome_unknown
from prefect_gptimage.schemas import AnyRequest, GptImageOutput, RequestHandle, check_request_id

logger = logging.getLogger("prefect_gptimage.client")

T = TypeVar("T")
#: A piece of client logic: yields ops, receives their outcomes, returns a T.
Steps = Generator[Op, Any, T]

#: fal_client's and fal-js's floor for a start timeout (``X-Fal-Request-Timeout``), in seconds.
MIN_START_TIMEOUT = 1.0


class Shell:
    """What both clients share: the key (None: fal_client's credential chain), the retry policy
    and the body limits. Each shell builds its httpx client on first use
    (:mod:`prefect_gptimage.fal._connect`)."""

    def __init__(
        self,
        key: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        limits: BodyLimits | None = None,
    ) -> None:
        self._key = key
        self.retry = retry or RetryPolicy()
        self.limits = limits or BodyLimits()


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
    webhook_url: str | None = None,
) -> Steps[RequestHandle]:
    """Submit (billable), resending only what provably never reached fal's queue; with
    ``webhook_url``, fal POSTs the outcome there when the request ends.

    A request naming inputs fal cannot fetch (local paths, ``s3://``) is refused unsent: the
    inputs layer (:mod:`prefect_gptimage.inputs`) makes them fetchable first.
    """
    unresolved = getattr(request, "unresolved_inputs", None)
    if unresolved:
        raise InvalidRequestError(
            "image_urls",
            f"{unresolved[0]!r} is not fetchable by fal: resolve the request's inputs first "
            "(prefect_gptimage.inputs.resolve_inputs; the flows and tasks do it)",
        )
    op = Submit(request, submit_headers(start_timeout, headers), webhook_url)

    def attempt() -> Steps[RequestHandle]:
        try:
            answer: httpx.Response = yield op
        except FalError as error:
            return (yield from _adopt(request, error))
        return accepted(request, answer)

    return (yield from retried(policy, attempt))


def submit_headers(
    start_timeout: float | None, headers: dict[str, str] | None
) -> tuple[tuple[str, str], ...]:
    """A submit's headers: the caller's, and ``X-Fal-Request-Timeout`` for ``start_timeout``
    (seconds fal may take to start it, over 1 s, as fal_client requires)."""
    out = dict(headers or {})
    if start_timeout is not None:
        if not start_timeout > MIN_START_TIMEOUT:
            raise InvalidRequestError(
                "start_timeout", f"must be over {MIN_START_TIMEOUT:.0f} s, got {start_timeout!r}"
            )
        out["X-Fal-Request-Timeout"] = str(float(start_timeout))
    return tuple(out.items())


def accepted(request: AnyRequest, answer: httpx.Response) -> RequestHandle:
    """The handle of a request fal accepted (a 2xx answer to its submit).

    An answer without a usable request id leaves a request fal has most likely enqueued, and will
    bill, with no safe way to follow it: :class:`SubmitOutcomeUnknown`, never resent.
    """
    try:
        data = answer.json()
    except ValueError:
        data = None
    if not isinstance(data, dict) or "request_id" not in data:
        raise submit_outcome_unknown(request.endpoint, "a success answer without a request id")
    try:
        request_id = check_request_id(data["request_id"])
    except ValueError as exc:
        raise submit_outcome_unknown(request.endpoint, f"a malformed request id: {exc}") from None
    urls = {k: data.get(k) for k in ("status_url", "response_url", "cancel_url")}
    return RequestHandle(
        endpoint=request.endpoint,
        request_id=request_id,
        **{k: v if isinstance(v, str) else None for k, v in urls.items()},
        submitted_at=time.time(),
        profile=request.profile,
    )


def _adopt(request: AnyRequest, error: FalError) -> Steps[RequestHandle]:
    """After a submit answered 5xx *with* a request id: resume that request if fal enqueued it.

    If fal does not know the id, nothing was enqueued and ``error`` (transient) may be resent; if
    fal cannot say, the outcome is unknown and nothing is resent.
    """
    if not (error.request_id and (error.status_code or 0) >= 500):
        raise error
    try:
        request_id = check_request_id(error.request_id)
    except ValueError as exc:
        what = f"HTTP {error.status_code} naming a malformed request id: {exc}"
        raise submit_outcome_unknown(request.endpoint, what) from None
    candidate = RequestHandle(
        endpoint=request.endpoint,
        request_id=request_id,
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
