"""Cache keys and cache reads: what makes a paid request the same request, and where it is kept.

**Never pay twice.** A submit is cached on the endpoint and the normalized request (every
default spelled out; credentials excluded) and persisted, so a task retry, a flow retry or a later
run of the same request, on this machine or any other sharing the result storage, gets the same
fal request id back and resumes it instead of submitting again. A fetched result is cached on its
request id and persisted the moment it arrives (fal keeps results only 6 to 60 minutes). Both
expire after :data:`CACHE_EXPIRATION` (6 days: fal keeps media URLs at least 7).

The two cache policies are the only place these keys are computed; pipelines read a cache hit
straight from the result store (:func:`cached_generation`), without the cost of a task run.

**Never pay twice at the same moment.** The cache alone cannot stop two processes that miss it
together from both submitting. With ``PREFECT_GPTIMAGE_LOCK_URL=redis://host:port/db`` (read at
run time), :data:`SUBMIT_CACHE` runs each submit in a Prefect transaction of isolation level
``SERIALIZABLE`` whose lock manager is the package's Redis lock
(:class:`~prefect_gptimage.tasks.locks.RedisSubmitLocks`, Prefect's public ``LockManager``
protocol on redis-py): the first process to reach a request takes its lock, submits and commits
the record; any other waits for the lock, then finds the record and reuses that fal request.
Each lock is a lease of :func:`lock_lease` seconds (5 minutes, or twice
``PREFECT_GPTIMAGE_RETRY_BUDGET`` if longer), so a holder that crashes blocks the others for at
most that long. Every Redis call of the lock (taking it, waiting for it, giving it back) rides
out a Redis restart or outage shorter than ``PREFECT_GPTIMAGE_RETRY_BUDGET``, retried under the
package's one :class:`~prefect_gptimage.retry.RetryPolicy`. If Redis stays away longer, a submit
that is not cached fails with :class:`LockServiceUnavailable` before anything is sent to fal,
while a lock that cannot be given back after its submit was recorded is only logged: its lease
frees it. Without the variable there is no lock (the policy is exactly a key function, as
before). The lock itself lives in :mod:`prefect_gptimage.tasks.locks`.

Example:
    >>> from prefect_gptimage.schemas import GptImageRequest
    >>> submit_cache_key(GptImageRequest(prompt="a kite")).startswith("gptimage-submit-")
    True
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.locking.protocol import LockManager
from prefect.results import ResultStore, get_result_store
from prefect.transactions import IsolationLevel
from prefect.utilities.asyncutils import run_coro_as_sync

from prefect_gptimage.schemas import (
    AnyRequest,
    GptImageOutput,
    RequestHandle,
    request_fingerprint,
    stable_url,
)
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.locks import (  # re-exported: the lock's names, as before
    MIN_LOCK_LEASE,
    LockServiceUnavailable,
    lock_lease,
    redis_lock_manager,
)

__all__ = [
    "CACHE_EXPIRATION",
    "MIN_LOCK_LEASE",
    "RESULT_CACHE",
    "SUBMIT_CACHE",
    "LockServiceUnavailable",
    "cached_generation",
    "cached_value",
    "is_submit_cached",
    "lock_lease",
    "read_record",
    "redis_lock_manager",
    "request_fingerprint",
    "result_cache_key",
    "stable_url",
    "submit_cache_key",
]

CACHE_EXPIRATION = timedelta(days=6)


def submit_cache_key(request: AnyRequest, variant: int = 0) -> str:
    """The cache key of a submit of this request."""
    return "gptimage-submit-" + request_fingerprint(request, variant)


def result_cache_key(handle: RequestHandle) -> str:
    """The cache key of the fetched result of this fal request."""
    return f"gptimage-result-{handle.endpoint.replace('/', '_')}-{handle.request_id}"


def _submit_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return submit_cache_key(parameters["request"], parameters.get("variant", 0))


def _result_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return result_cache_key(parameters["handle"])


class LockingKeyFnPolicy(CacheKeyFnPolicy):
    """A key-function policy that locks through ``PREFECT_GPTIMAGE_LOCK_URL`` when it is set.

    The variable is read each time Prefect asks (when a task run starts), not at import, so a
    process can set it at any time before it runs the task. A lock manager or isolation level
    configured explicitly (``.configure(...)``) takes precedence.
    """

    _lock_manager: LockManager | None = None
    _isolation_level: Any = None

    @property  # type: ignore[override]
    def lock_manager(self) -> LockManager | None:
        if self._lock_manager is not None:
            return self._lock_manager
        url = get_settings().lock_url
        return redis_lock_manager(url) if url else None

    @lock_manager.setter
    def lock_manager(self, value: LockManager | None) -> None:
        self._lock_manager = value

    @property  # type: ignore[override]
    def isolation_level(self) -> Any:
        if self._isolation_level is not None:
            return self._isolation_level
        return IsolationLevel.SERIALIZABLE if get_settings().lock_url else None

    @isolation_level.setter
    def isolation_level(self, value: Any) -> None:
        self._isolation_level = value


#: Cache policy of the submit tasks (sync and async share it, so they share the records);
#: serialized across processes when ``PREFECT_GPTIMAGE_LOCK_URL`` is set.
SUBMIT_CACHE = LockingKeyFnPolicy(cache_key_fn=_submit_key)
#: Cache policy of the fetch-result tasks.
RESULT_CACHE = CacheKeyFnPolicy(cache_key_fn=_result_key)


def _records() -> None:
    """Stands for every cached step of this package when the result store is resolved."""


#: The cached tasks' options as a task, so reads resolve the store exactly as the tasks do
#: (default result storage: ``PREFECT_LOCAL_STORAGE_PATH``, or the block named by
#: ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``).
_RECORDS = task(cache_policy=RESULT_CACHE, persist_result=True)(_records)


def _store() -> ResultStore:
    """The store the cached tasks write to, without a lock manager.

    Resolved by Prefect's public ``ResultStore.aupdate_for_task`` for a task with the cached
    tasks' options, exactly as the engine resolves theirs (the run's result storage, else the
    default: ``PREFECT_LOCAL_STORAGE_PATH``, or the block named by
    ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``). It is run to completion with Prefect's
    ``run_coro_as_sync``, since these reads run in sync code (flows, the CLI), inside async
    flows too.

    These reads only look for a committed record; a miss goes on to the submit task, which takes
    the lock. So a cache hit needs no lock service (it still works while Redis is down) and never
    waits behind another process's submit.
    """
    store: ResultStore = run_coro_as_sync(get_result_store().aupdate_for_task(_RECORDS))
    return store.model_copy(update={"lock_manager": None}) if store.lock_manager else store


def read_record(store: ResultStore, key: str) -> Any | None:
    """The value of the unexpired record ``key`` in ``store``, or None, in one read.

    As ``store.exists(key)`` decides (a record that cannot be read, or has expired, is a miss),
    but that reads the whole record too: exists-then-read read every record twice.
    """
    try:
        record = store.read(key)
    except Exception:  # missing or unreadable: a miss, as for ResultStore.exists
        return None
    expiration = record.metadata.expiration
    if expiration is not None and expiration <= datetime.now(timezone.utc):
        return None
    return record.result


def cached_value(key: str) -> Any | None:
    """The value cached under ``key``, read straight from the result store, or None."""
    return read_record(_store(), key)


def is_submit_cached(
    request: AnyRequest, variant: int = 0, *, store: ResultStore | None = None
) -> bool:
    """Whether this request was already submitted (and cached): re-running it is free.
    ``store``: the records' store when it is resolved already (see ``intents.fate_stores``)."""
    return (store or _store()).exists(submit_cache_key(request, variant))


def cached_generation(
    request: AnyRequest, variant: int = 0
) -> tuple[RequestHandle, GptImageOutput] | None:
    """Handle and output of a request already submitted and fetched, or None."""
    handle = cached_value(submit_cache_key(request, variant))
    if not isinstance(handle, RequestHandle):
        return None
    output = cached_value(result_cache_key(handle))
    return (handle, output) if isinstance(output, GptImageOutput) else None
