"""Prefect tasks over fal's queue: submit, wait, fetch result, cancel, each with an async twin.

Thin wrappers over the client layer (:mod:`prefect_gptimage.fal`), in prefect-aws's style: a task
per operation, and an async twin named with an ``a`` prefix that shares the task's name, cache
policy and records, and runs the same body in a worker thread (see :mod:`._twin`). The client
retries transient failures itself (the one retry layer, :mod:`prefect_gptimage.retry`), so these
tasks have no Prefect retries.

The paid steps are cached (see :mod:`prefect_gptimage.tasks.cache`): :func:`submit_request` on
the normalized request, :func:`fetch_result` on the request id, both persisted the moment they
complete. ``refresh_cache=True`` submits anew; ``variant`` asks for a fresh image of an identical
request. Each submit is written down before it is sent (:mod:`prefect_gptimage.tasks.intents`), so
one whose outcome is unknown (possibly billed) is not paid again by a re-run.

:func:`submit_recorded` and :func:`fetch_recorded` are the same paid steps as plain calls, for a
task that must not open a task run per step (a batch row is one task run): each runs in a Prefect
transaction on the task's own cache key (:func:`~prefect_gptimage.tasks.cache.submit_cache_key`,
:func:`~prefect_gptimage.tasks.cache.result_cache_key`) committed the moment the step returns, so
the tasks and the plain calls find each other's records, and a process killed right after fal
accepted a submit is resumed by the next run. The submit's transaction takes the same lock as the
submit task (``PREFECT_GPTIMAGE_LOCK_URL``: :data:`~prefect_gptimage.tasks.cache.SUBMIT_CACHE`).

Example:
    >>> from prefect import flow
    >>> from prefect_gptimage import GptImageRequest, submit_request, fetch_result
    >>> @flow
    ... def poster() -> list[str]:
    ...     handle = submit_request(GptImageRequest(prompt="a tram in fog", quality="low"))
    ...     return [img.url for img in fetch_result(handle).images]
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar, cast

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.results import ResultStore
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE
from prefect.transactions import CommitMode, IsolationLevel, transaction

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.fal.client import FalQueueClient
from prefect_gptimage.fal.polling import RequestStatus
from prefect_gptimage.fal.retention import Retention
from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.schemas import AnyRequest, GptImageOutput, RequestHandle
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks import cache
from prefect_gptimage.tasks._twin import async_twin
from prefect_gptimage.tasks.cache import (
    CACHE_EXPIRATION,
    RESULT_CACHE,
    SUBMIT_CACHE,
    result_cache_key,
    submit_cache_key,
)
from prefect_gptimage.tasks.callbacks import wait_for_outcome
from prefect_gptimage.tasks.concurrency import fal_completed
from prefect_gptimage.tasks.fleet_budget import take_budget
from prefect_gptimage.tasks.intents import guarded_submit
from prefect_gptimage.tasks.policies import body_limits, retry_policy

__all__ = [
    "acancel_request",
    "afetch_result",
    "asubmit_request",
    "cancel_request",
    "fetch_recorded",
    "fetch_result",
    "record_once",
    "submit_recorded",
    "submit_request",
    "wait_for_request",
]

#: Options of the cached, persisted submit tasks (sync and async share the records).
SUBMIT_OPTIONS: dict[str, Any] = {
    "name": "gptimage-submit",
    "task_run_name": "submit {request.endpoint}",
    "cache_policy": SUBMIT_CACHE,
    "cache_expiration": CACHE_EXPIRATION,
    "persist_result": True,
}
#: Options of the cached, persisted fetch-result tasks.
FETCH_OPTIONS: dict[str, Any] = {
    "name": "gptimage-fetch-result",
    "task_run_name": "fetch {handle.request_id}",
    "cache_policy": RESULT_CACHE,
    "cache_expiration": CACHE_EXPIRATION,
    "persist_result": True,
}
CANCEL_OPTIONS: dict[str, Any] = {
    "name": "gptimage-cancel",
    "task_run_name": "cancel {handle.request_id}",
    "cache_policy": NO_CACHE,
}


def sync_client(credentials: FalCredentials | None) -> FalQueueClient:
    """The shared client for ``credentials`` (None: the environment's key), with the settings'
    retry policy and body limits."""
    key = (credentials or FalCredentials()).get_key()
    return FalQueueClient.shared(key, retry_policy(), body_limits())


def _submitted(handle: RequestHandle, request: AnyRequest) -> RequestHandle:
    get_run_logger().info(
        "submitted %s to %s (%d image(s), %s quality)",
        handle.request_id,
        request.endpoint,
        request.num_images,
        request.quality,
    )
    return handle


def _refreshing() -> bool:
    """Whether the running task was asked to ignore its cache (``refresh_cache``)."""
    context = TaskRunContext.get()
    if context is None:
        return False
    refresh = context.task.refresh_cache
    return bool(PREFECT_TASKS_REFRESH_CACHE.value() if refresh is None else refresh)


@task(**SUBMIT_OPTIONS)
def submit_request(
    request: AnyRequest,
    credentials: FalCredentials | None = None,
    variant: int = 0,
    start_timeout: float | None = None,
    resubmit_unknown: bool = False,
) -> RequestHandle:
    """Submit one request to fal's queue (the only billable call); cached and persisted.

    The submit is written down before it is sent (:mod:`prefect_gptimage.tasks.intents`): if an
    earlier submit of the same request may have been enqueued and billed without its answer being
    stored (a dropped connection, a killed process), this fails with ``SubmitOutcomeUnknown``
    ("outcome unknown, possibly billed") instead of paying again, unless ``resubmit_unknown`` (or
    the task's ``refresh_cache``) asks for a new submit.

    Example:
        >>> handle = submit_request(GptImageRequest(prompt="a koi pond", quality="low"))
        >>> handle.request_id
    """
    return _submit(request, credentials, variant, start_timeout, resubmit_unknown, _refreshing())


def default_retention() -> Retention:
    """What fal may keep of a request by the settings (``PREFECT_GPTIMAGE_STORE_IO``,
    ``PREFECT_GPTIMAGE_MEDIA_EXPIRES``)."""
    settings = get_settings()
    return Retention(store_io=settings.store_io, media_expires=settings.media_expires)


def _submit(
    request: AnyRequest,
    credentials: FalCredentials | None,
    variant: int,
    start_timeout: float | None,
    resubmit_unknown: bool,
    refresh: bool,
    on_send: Callable[[], None] | None = None,
    retention: Retention | None = None,
    budget_wait: float = 0.0,
) -> RequestHandle:
    """The submit itself, under the intent protocol (the task's body and the plain call's).

    ``on_send`` is called when a submit is really sent to fal (not when a recorded one is
    resumed): what this call paid for. ``retention``: what fal may keep of it (None: the
    settings ``PREFECT_GPTIMAGE_STORE_IO`` and ``PREFECT_GPTIMAGE_MEDIA_EXPIRES``). Right
    before sending, the request takes its price from the fleet budget
    (:func:`~prefect_gptimage.tasks.fleet_budget.take_budget`, waiting up to ``budget_wait``
    s): a :class:`~prefect_gptimage.errors.BudgetExhausted` sends nothing.
    """
    client = sync_client(credentials)
    settings = get_settings()
    headers = dict((retention or default_retention()).headers())
    if settings.queue_priority == "low":  # behind the endpoint's normal requests at fal
        headers["X-Fal-Queue-Priority"] = "low"

    def send() -> RequestHandle:
        take_budget(estimate_cost(request), wait=budget_wait)
        if on_send is not None:
            on_send()
        return client.submit(
            request,
            start_timeout=start_timeout,
            headers=headers or None,
            webhook_url=settings.webhook_url,
        )

    handle = guarded_submit(
        request, variant, send, resubmit_unknown=resubmit_unknown, refresh=refresh
    )
    return _submitted(handle, request)


@task(
    name="gptimage-wait",
    task_run_name="wait {handle.request_id}",
    cache_policy=NO_CACHE,
)
def wait_for_request(
    handle: RequestHandle,
    credentials: FalCredentials | None = None,
    timeout: float | None = None,
) -> RequestStatus:
    """Poll until the request completes, forwarding fal's logs and queue position.

    Polls adaptively (learns the usual latency; see :mod:`prefect_gptimage.fal.polling`). After
    ``timeout`` seconds the fal request is cancelled and the task fails.

    Example:
        >>> status = wait_for_request(handle, timeout=600)
    """
    return sync_client(credentials).wait(handle, timeout=timeout, log=get_run_logger())


@task(**FETCH_OPTIONS)
def fetch_result(
    handle: RequestHandle,
    credentials: FalCredentials | None = None,
    wait: bool = True,
    timeout: float | None = None,
) -> GptImageOutput:
    """Fetch (after waiting, by default) the output of a request; cached on its request id.

    Example:
        >>> output = fetch_result(handle)
        >>> [img.url for img in output.images]
    """
    return _fetch(handle, credentials, wait, timeout)


def _fetch(
    handle: RequestHandle, credentials: FalCredentials | None, wait: bool, timeout: float | None
) -> GptImageOutput:
    """Wait for and read a request's output (the task's body and the plain call's)."""
    client = sync_client(credentials)
    if wait:
        # by its callback when PREFECT_GPTIMAGE_WEBHOOK_URL is set, else by polling
        output = wait_for_outcome(client, handle, timeout, get_run_logger())
        fal_completed()  # nothing runs at fal any more: its slot may take the next request
        if output is not None:
            return output
    return client.result(handle)


@task(**CANCEL_OPTIONS)
def cancel_request(handle: RequestHandle, credentials: FalCredentials | None = None) -> bool:
    """Cancel a request; False if it had already completed.

    Example:
        >>> cancel_request(handle)
    """
    return sync_client(credentials).cancel(handle)


T = TypeVar("T")


def _recorded(
    key: str, compute: Callable[[], T], *, refresh: bool = False, locked: bool = False
) -> tuple[T, bool]:
    """``compute()`` in a transaction on the cache record ``key``, committed as soon as it
    returns; (value, True) without calling it when the record exists (and not ``refresh``).

    ``locked``: serialize across processes as the submit task does (the lock manager and
    isolation level of :data:`SUBMIT_CACHE`: ``PREFECT_GPTIMAGE_LOCK_URL``).
    """
    store: ResultStore = cache._store()  # the cached tasks' store (default result storage)
    isolation = SUBMIT_CACHE.isolation_level if locked else None
    if isolation is not None:
        store = store.model_copy(update={"lock_manager": SUBMIT_CACHE.lock_manager})
    with transaction(
        key=key,
        store=store,
        commit_mode=CommitMode.EAGER,
        # explicit: never inherit a caller's SERIALIZABLE without this store's lock manager
        isolation_level=IsolationLevel(isolation) if isolation else IsolationLevel.READ_COMMITTED,
        overwrite=refresh,
    ) as txn:
        if txn.is_committed():
            record = txn.read()
            if record is not None:
                return cast(T, record.result), True
        value = compute()
        expiration = cast(Any, datetime.now(timezone.utc) + CACHE_EXPIRATION)
        txn.stage(store.create_result_record(value, key=key, expiration=expiration))
    return value, False


def record_once(key: str, compute: Callable[[], T]) -> tuple[T, bool]:
    """``compute()`` recorded under ``key`` in the cache's result storage, unless a record is
    there already: (value, True) then, without calling it. Serialized across processes as the
    submits are (``PREFECT_GPTIMAGE_LOCK_URL``); the webhook receiver records callbacks so."""
    return _recorded(key, compute, locked=True)


def submit_recorded(
    request: AnyRequest,
    credentials: FalCredentials | None = None,
    variant: int = 0,
    *,
    resubmit_unknown: bool = False,
    refresh: bool = False,
    start_timeout: float | None = None,
    retention: Retention | None = None,
    budget_wait: float = 0.0,
) -> tuple[RequestHandle, bool]:
    """:func:`submit_request` as a plain call: (handle, not paid by this call).

    ``retention``: what fal may keep of the request (None: the settings); not part of its
    identity (cache key).

    Its record is the task's (same key, same store, same lock) and is committed the moment fal
    accepts, so a ``kill -9`` right after is resumed by the next run, not paid again. The flag is
    True when the handle came from the cache record, or from the submit intent of a run killed
    before it committed that record (resumed, not sent again): this call paid nothing.
    """
    sent: list[bool] = []
    handle, from_record = _recorded(
        submit_cache_key(request, variant),
        lambda: _submit(
            request,
            credentials,
            variant,
            start_timeout,
            resubmit_unknown,
            refresh,
            on_send=lambda: sent.append(True),
            retention=retention,
            budget_wait=budget_wait,
        ),
        refresh=refresh,
        locked=True,
    )
    return handle, from_record or not sent


def fetch_recorded(
    handle: RequestHandle,
    credentials: FalCredentials | None = None,
    *,
    timeout: float | None = None,
) -> tuple[GptImageOutput, bool]:
    """:func:`fetch_result` (waiting first) as a plain call: (output, served from the cache).

    Its record is the task's, committed the moment the output arrives (fal keeps results only
    for a while).
    """
    return _recorded(result_cache_key(handle), lambda: _fetch(handle, credentials, True, timeout))


asubmit_request = task(**SUBMIT_OPTIONS)(async_twin(submit_request.fn))
afetch_result = task(**FETCH_OPTIONS)(async_twin(fetch_result.fn))
acancel_request = task(**CANCEL_OPTIONS)(async_twin(cancel_request.fn))
