"""Retry, decided in one place: what is transient, what is permanent, and how long to keep trying.

Every outcome the package meets is mapped here; the fal client layer, media downloads and S3
staging all ask this module, and exactly one layer retries a given call (the README's retry table
lists them). Nothing here imports Prefect, though :func:`transient_retries` gives Prefect task
options for tasks whose calls do not retry themselves.

=====================================================  =====================================
outcome                                                verdict
=====================================================  =====================================
HTTP 408, 409, 425, 429 (fal, media)                   transient
HTTP 5xx, json or ingress style (fal, media)           transient
``X-Fal-Retryable: true`` / ``false`` on any status    transient / permanent (fal decides)
HTTP 504 with ``X-Fal-Request-Timeout-Type``           permanent (the caller's start timeout)
HTTP 404, 410 on media                                 permanent (the file is gone)
other HTTP 4xx (401, 403, 404, 422, ...)               permanent
transport errors and timeouts (httpx)                  transient
a **submit** that may have reached fal's queue (read   :class:`SubmitOutcomeUnknown`: never
error after sending, dropped connection, ingress       resent, fal may have accepted and
502/504 without ``x-fal-request-id``, 2xx without id)  billed it
S3 throttling codes, HTTP 408/429/5xx                  transient
botocore connection errors, timeouts, cut bodies       transient
other S3 4xx, missing credentials, TLS failures        permanent
Prefect API (a global concurrency slot): connection    transient
refused or reset, timeouts, HTTP 408/425/429/5xx
(the server restarting, overloaded, its database away)
Prefect API: other 4xx (a missing limit, a bad lease)  permanent
Redis (the submit lock): connection refused, reset or  transient
closed, timeouts, ``LOADING`` (a restarted server
reading its data), ``READONLY`` (a failover under way)
Redis: wrong password or ACL, any other Redis error    permanent
=====================================================  =====================================

(The S3 rows are implemented in the private ``prefect_gptimage._retry_s3``, the Prefect API and
Redis rows (:func:`is_transient_prefect_api_error`, :func:`is_transient_redis_error`) in
``prefect_gptimage._retry_services``, both re-exported here.)

How long: :class:`RetryPolicy` retries a transient failure with exponential backoff and jitter
until its ``budget`` (seconds, from the first attempt) or ``attempts`` runs out, then raises the
last error with the attempts and time spent. With fal unreachable, a command therefore fails after
about ``budget`` seconds instead of stacking retries layer over layer. S3 calls get the same
policy and budget (:meth:`RetryPolicy.from_settings`): botocore's own retries are off, so an S3
outage or a burst of ``SlowDown`` shorter than the budget is ridden out by every row. So do the
calls that take and give back a global concurrency slot on the Prefect server
(:mod:`prefect_gptimage.tasks.concurrency`), with the budget counted from their first failure
(``budget_from_first_failure``): taking a slot may rightly wait minutes for a free one first.
The calls of the Redis submit lock (taking it, waiting for it, giving it back:
:mod:`prefect_gptimage.tasks.cache`) are retried the same way, so a Redis restart shorter than
the budget is ridden out by every row.

Example:
    >>> is_transient_status(503, {})
    True
    >>> is_transient_status(504, {"X-Fal-Request-Timeout-Type": "user"})
    False
    >>> is_transient_status(404, {}, media=True)
    False
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import tenacity
from pydantic import BaseModel, ConfigDict, Field

from prefect_gptimage._retry_s3 import (  # re-exported: the table's S3 rows
    S3_TRANSIENT_CODES as S3_TRANSIENT_CODES,
)
from prefect_gptimage._retry_s3 import (
    exception_chain as exception_chain,
)
from prefect_gptimage._retry_s3 import (
    is_transient_s3_error as is_transient_s3_error,
)
from prefect_gptimage._retry_services import (  # re-exported: the Prefect API and Redis rows
    PREFECT_API_TRANSIENT_CODES as PREFECT_API_TRANSIENT_CODES,
)
from prefect_gptimage._retry_services import (
    is_transient_prefect_api_error as is_transient_prefect_api_error,
)
from prefect_gptimage._retry_services import (
    is_transient_redis_error as is_transient_redis_error,
)
from prefect_gptimage.errors import (
    FalError,
    FalRequestFailed,
    GptImageError,
    PermanentFalError,
    SubmitOutcomeUnknown,
    TransientFalError,
    is_transient,
)

logger = logging.getLogger("prefect_gptimage.retry")

#: Statuses worth retrying on fal's queue and CDN alike: timeouts, conflicts, rate limits.
TRANSIENT_STATUS_CODES = frozenset({408, 409, 425, 429})
#: Media statuses that mean the file is gone for good.
GONE_STATUS_CODES = frozenset({404, 410})
#: Ingress answers (no ``x-fal-request-id``) that leave a submit's outcome unknown.
UNKNOWN_SUBMIT_CODES = frozenset({502, 504})

#: Transport failures where nothing was sent: a submit may be resent safely.
NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
)


def is_transient_status(
    status_code: int, headers: Mapping[str, str] | httpx.Headers, *, media: bool = False
) -> bool:
    """Whether an HTTP error status is worth retrying (fal's queue, or ``media=True``: its CDN)."""
    lower = {k.lower(): v for k, v in headers.items()}
    retryable = lower.get("x-fal-retryable", "").strip().lower()
    if retryable in ("true", "false"):
        return retryable == "true"
    if status_code == 504 and lower.get("x-fal-request-timeout-type"):
        return False
    if media and status_code in GONE_STATUS_CODES:
        return False
    return status_code in TRANSIENT_STATUS_CODES or status_code >= 500


def is_ingress(response: httpx.Response) -> bool:
    """An answer from fal's nginx ingress, not from fal's queue service itself."""
    return "x-fal-request-id" not in response.headers


def detail_text(detail: Any) -> str:
    """fal's ``detail`` as one readable line (a string, or a list of validation errors)."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                msg = item.get("msg") or item.get("type") or "invalid"
                parts.append(f"{loc}: {msg}" if loc else str(msg))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def fal_http_error(
    status_code: int,
    headers: Mapping[str, str] | httpx.Headers,
    body: Any,
    *,
    operation: str,
    host: str | None = None,
    request_id: str | None = None,
    secrets: Sequence[str] = (),
) -> FalError:
    """The :class:`FalError` for an error answer of ``operation``.

    ``secrets`` (the key the request carried) are cut out of the body first: a proxy's 401 or a
    500 may echo the ``Authorization`` header, and the message reaches logs, manifests and S3.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    error_type = None
    body = redact(body, secrets)
    detail: Any = body
    if isinstance(body, dict):
        detail = body.get("detail", body)
        error_type = body.get("error_type")
    error_type = error_type or lower.get("x-fal-error-type")
    text = detail_text(detail) if detail not in (None, "") else f"HTTP {status_code}"
    if not isinstance(body, dict) and "nginx" in str(body):
        text = f"HTTP {status_code} from fal's gateway"
    where = f" at {host}" if host else ""
    message = f"fal {operation}{where} failed with HTTP {status_code}"
    if error_type:
        message += f" ({error_type})"
    message += f": {text}"
    cls = TransientFalError if is_transient_status(status_code, lower) else PermanentFalError
    return cls(
        message,
        status_code=status_code,
        error_type=error_type,
        request_id=request_id or lower.get("x-fal-request-id"),
        detail=detail,
    )


def request_secrets(request: httpx.Request | None) -> tuple[str, ...]:
    """The key a request carries (``Authorization: Key id:secret``), whole and by halves."""
    value = request.headers.get("authorization", "") if request is not None else ""
    token = value.split(" ", 1)[-1].strip()
    parts = [token, *token.split(":")] if token else []
    return tuple(sorted({p for p in parts if len(p) >= 4}, key=len, reverse=True))


def redact(value: Any, secrets: Sequence[str]) -> Any:
    """``value`` (text, or JSON-like data) with every secret replaced by ``<redacted>``.

    Example:
        >>> redact({"detail": "bad key abcd:efgh"}, ("abcd:efgh", "abcd", "efgh"))
        {'detail': 'bad key <redacted>'}
    """
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "<redacted>")
        return value
    if isinstance(value, list):
        return [redact(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    return value


def fal_response_error(
    response: httpx.Response, operation: str, request_id: str | None = None
) -> FalError:
    """:func:`fal_http_error` for an httpx response (its body already read)."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    try:
        request: httpx.Request | None = response.request
    except RuntimeError:  # a response built without its request
        request = None
    return fal_http_error(
        response.status_code,
        response.headers,
        body,
        operation=operation,
        host=request.url.host if request is not None else None,
        request_id=request_id,
        secrets=request_secrets(request),
    )


def fal_transport_error(exc: httpx.TransportError, operation: str, host: str) -> FalError:
    """A connection problem on the way to fal: transient (and resendable when nothing was sent)."""
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "connection problem"
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        kind = "cannot connect"
    return TransientFalError(f"fal {operation} at {host}: {kind} ({type(exc).__name__})")


def submit_outcome_unknown(path: str, what: str) -> SubmitOutcomeUnknown:
    """A submit that was sent but got no usable answer: fal may have accepted and billed it."""
    return SubmitOutcomeUnknown(
        f"submit to {path} got no usable answer ({what}); fal may have accepted and billed it, "
        "so it is not retried. Check fal's dashboard, or run again with resubmit_unknown=True "
        "(CLI --resubmit-unknown) to submit anew.",
    )


def resubmit_reason(exc: BaseException) -> str | None:
    """Why a *fresh submit* may succeed where the submitted request cannot, or None.

    Not a retry of the same call: the request ended at fal, and a new one is paid for only when
    fal did not bill the first (a 5xx failure on their side) or no longer knows it.
    """
    if isinstance(exc, FalRequestFailed) and exc.resubmittable:
        return f"it failed at fal on their side ({exc.error_type or exc.status_code}), not billed"
    if isinstance(exc, PermanentFalError) and exc.status_code == 404:
        return "fal no longer knows it (results are kept 6 to 60 minutes)"
    return None


# --- how long -----------------------------------------------------------------------------------


class RetryPolicy(BaseModel):
    """How one call retries its transient failures: backoff with jitter, within a time budget.

    Example:
        >>> RetryPolicy(budget=5).budget
        5.0
    """

    model_config = ConfigDict(frozen=True)

    budget: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a call may spend retrying, from its first attempt.",
    )
    attempts: int | None = Field(default=None, ge=1, description="Cap on attempts (None: none).")
    initial_delay: float = Field(default=0.25, ge=0, description="First backoff, in seconds.")
    max_delay: float = Field(default=8.0, ge=0, description="Longest backoff, in seconds.")

    @classmethod
    def from_settings(cls) -> RetryPolicy:
        """The policy of every call, fal's and S3's: ``PREFECT_GPTIMAGE_RETRY_BUDGET`` seconds
        of retrying, backoff up to ``PREFECT_GPTIMAGE_RETRY_MAX_DELAY`` (read now, not cached).
        """
        from prefect_gptimage.settings import get_settings  # Prefect's settings: only when asked

        settings = get_settings()
        return cls(budget=settings.retry_budget, max_delay=settings.retry_max_delay)

    def retrying(
        self, *, retry_on: Any = None, budget_from_first_failure: bool = False
    ) -> tenacity.Retrying:
        """A tenacity ``Retrying`` for a sync call (``retry_on``: default, transient errors).

        ``budget_from_first_failure``: count the budget from the end of the first failed attempt,
        not from the first attempt's start, for a call that may rightly wait long before it
        fails (taking a concurrency slot waits for a free one).
        """
        return tenacity.Retrying(**self._options(retry_on, budget_from_first_failure))

    def async_retrying(self, *, retry_on: Any = None) -> tenacity.AsyncRetrying:
        """The same policy for an async call."""
        return tenacity.AsyncRetrying(**self._options(retry_on, False))

    def _options(self, retry_on: Any, from_first_failure: bool) -> dict[str, Any]:
        stop: Any = (
            _StopAfterFailingFor(self.budget)
            if from_first_failure
            else tenacity.stop_after_delay(self.budget)
        )
        if self.attempts is not None:
            stop = stop | tenacity.stop_after_attempt(self.attempts)
        return {
            "retry": tenacity.retry_if_exception(retry_on or is_transient),
            "stop": stop,
            "wait": tenacity.wait_exponential(multiplier=self.initial_delay, max=self.max_delay)
            + tenacity.wait_random(0, self.initial_delay),
            "retry_error_callback": _give_up,
            "before_sleep": _log_retry,
        }


class _StopAfterFailingFor(tenacity.stop.stop_base):
    """Stop once a call has kept failing for ``budget`` seconds since its first failure."""

    def __init__(self, budget: float) -> None:
        self.budget = budget

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        now = retry_state.outcome_timestamp
        if now is None:  # pragma: no cover - tenacity asks only after an outcome
            return False
        first: float = retry_state.__dict__.setdefault("_first_failure", now)
        return now - first >= self.budget


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    logger.info("retrying after transient failure (attempt %d): %s", state.attempt_number, exc)


def _give_up(state: tenacity.RetryCallState) -> Any:
    """Raise the last error; when retries ran out, say how many and for how long."""
    exc = state.outcome.exception() if state.outcome else None
    if exc is None:  # pragma: no cover - tenacity only calls this after a failure
        raise RuntimeError("retry gave up without an error")
    if isinstance(exc, GptImageError) and exc.transient and state.attempt_number > 1:
        elapsed = state.seconds_since_start or 0.0
        exc.message += f" (gave up after {state.attempt_number} attempts in {elapsed:.0f}s)"
    raise exc


# --- Prefect-level retries, for tasks whose calls do not retry themselves ----------------------


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: True only when the failure is a transient one."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    # the async form, run here: in an async flow result() would hand back a coroutine
    exc = run_coro_as_sync(state.aresult(raise_on_failure=False))
    return isinstance(exc, BaseException) and is_transient(exc)


def transient_retries(retries: int = 4) -> dict[str, Any]:
    """Prefect task options: ``retries`` retries at 1, 2, 4, ... s (plus up to 50% jitter), for
    transient failures only. For a task whose calls do not retry themselves (one layer per call);
    the package's fal tasks and S3 staging tasks need none (their calls retry under
    :class:`RetryPolicy`).

    Example:
        >>> transient_retries(3)["retry_delay_seconds"]
        [1, 2, 4]
    """
    return {
        "retries": retries,
        "retry_delay_seconds": [2**i for i in range(retries)],
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": retry_if_transient,
    }


#: Prefect task options: 4 retries, 1 s, 2 s, 4 s, 8 s (plus up to 50% jitter), transient only.
TRANSIENT_RETRIES: dict[str, Any] = transient_retries()
