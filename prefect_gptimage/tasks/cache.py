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
``SERIALIZABLE`` with prefect-redis's ``RedisLockManager``: the first process to reach a request
takes its lock, submits and commits the record; any other waits for the lock, then finds the
record and reuses that fal request. Each lock is a lease of :func:`lock_lease` seconds (5 minutes,
or twice ``PREFECT_GPTIMAGE_RETRY_BUDGET`` if longer), so a holder that crashes blocks the others
for at most that long. If the Redis server cannot be reached, a submit that is not cached fails
with :class:`LockServiceUnavailable` before anything is sent to fal. Without the variable there is
no lock (the policy is exactly a key function, as before).

Example:
    >>> from prefect_gptimage.schemas import GptImageRequest
    >>> submit_cache_key(GptImageRequest(prompt="a kite")).startswith("gptimage-submit-")
    True
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.locking.protocol import LockManager
from prefect.results import ResultStore, get_result_store
from prefect.transactions import IsolationLevel

from prefect_gptimage.schemas import (
    AnyRequest,
    GptImageOutput,
    RequestHandle,
    request_fingerprint,
    stable_url,
)
from prefect_gptimage.settings import get_settings

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


logger = logging.getLogger("prefect_gptimage.tasks.cache")

#: Shortest lease of a submit lock, seconds (see :func:`lock_lease`).
MIN_LOCK_LEASE = 300.0


def lock_lease() -> float:
    """Seconds a submit lock is held at most: 5 minutes, or twice the retry budget if longer.

    The lock is held from the start of the submit task to the commit of its record: one submit
    call, bounded by ``PREFECT_GPTIMAGE_RETRY_BUDGET`` (90 s by default), plus two state updates
    to the Prefect API. A holder killed in between blocks the others for at most this long; then
    they submit the request themselves (a crashed holder's own submit may already have reached
    fal: that one, and only that one, can be paid twice).
    """
    return max(MIN_LOCK_LEASE, 2 * get_settings().retry_budget)


class LockServiceUnavailable(RuntimeError):
    """The lock service (``PREFECT_GPTIMAGE_LOCK_URL``) cannot be reached: nothing was submitted."""


@functools.cache
def _lease_lock_class() -> type[LockManager]:
    """prefect-redis's ``RedisLockManager`` with a lease on every lock (imported on first use)."""
    try:
        from prefect_redis import RedisLockManager  # type: ignore
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import LockError
        from redis.exceptions import TimeoutError as RedisTimeoutError
        from redis.lock import Lock
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "PREFECT_GPTIMAGE_LOCK_URL needs prefect-redis: pip install 'prefect-gptimage[redis]'"
        ) from exc

    unreachable = (RedisConnectionError, RedisTimeoutError, OSError)

    class LeasedRedisLockManager(RedisLockManager):  # type: ignore
        """``RedisLockManager`` whose locks expire after ``lease`` seconds.

        Prefect's transactions acquire without a hold timeout, and prefect-redis then takes a
        Redis lock that never expires: a holder killed with ``kill -9`` would block that request
        everywhere, forever. Async acquires take the same synchronous lock (in a worker thread),
        because Prefect releases every lock with the synchronous ``release_lock``.
        """

        def __init__(self, url: str, lease: float) -> None:
            self.lease = lease
            super().__init__(connection_url=url)

        def __reduce__(self) -> tuple[Any, ...]:
            return (_new_lock_manager, (self.connection_url, self.lease))

        def _unreachable(self, exc: Exception) -> LockServiceUnavailable:
            return LockServiceUnavailable(
                f"lock service {self.connection_url} unreachable ({exc}); nothing was submitted "
                "(PREFECT_GPTIMAGE_LOCK_URL)"
            )

        def acquire_lock(
            self,
            key: str,
            holder: str,
            acquire_timeout: float | None = None,
            hold_timeout: float | None = None,
        ) -> bool:
            try:
                return bool(
                    super().acquire_lock(key, holder, acquire_timeout, hold_timeout or self.lease)
                )
            except unreachable as exc:
                raise self._unreachable(exc) from exc

        async def aacquire_lock(self, *args: Any, **kwargs: Any) -> bool:
            # the sync lock, in a thread: Prefect releases locks synchronously, and prefect-redis's
            # async lock would hand that release a coroutine nobody awaits
            return await asyncio.to_thread(self.acquire_lock, *args, **kwargs)

        def release_lock(self, key: str, holder: str) -> None:
            try:
                super().release_lock(key, holder)
            except LockError:  # the lease ran out first (the record is written all the same)
                logger.warning("submit lock %s expired before it was released", key)
                self._locks.pop(self._lock_name_for_key(key), None)

        def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
            # prefect-redis takes the lock to wait for it, without a lease: not here
            lock = Lock(self.client, self._lock_name_for_key(key), timeout=self.lease)
            try:
                freed = bool(lock.acquire(blocking_timeout=timeout))
            except unreachable as exc:
                raise self._unreachable(exc) from exc
            if freed:
                lock.release()
            return freed

        async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
            return await asyncio.to_thread(self.wait_for_lock, key, timeout)

    return LeasedRedisLockManager


def _new_lock_manager(url: str, lease: float) -> LockManager:
    return _lease_lock_class()(url, lease)  # type: ignore[call-arg]


_managers = threading.local()


def redis_lock_manager(url: str, lease: float | None = None) -> LockManager:
    """The lock manager for ``url`` (one per thread, so concurrent holders never share one).

    Example:
        >>> redis_lock_manager("redis://localhost:6379/0").lease
        300.0
    """
    lease = lock_lease() if lease is None else lease
    cache: dict[tuple[str, float], LockManager] = getattr(_managers, "cache", None) or {}
    _managers.cache = cache
    if (url, lease) not in cache:
        cache[url, lease] = _new_lock_manager(url, lease)
    return cache[url, lease]


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

    These reads only look for a committed record; a miss goes on to the submit task, which takes
    the lock. So a cache hit needs no lock service (it still works while Redis is down) and never
    waits behind another process's submit.
    """
    # _sync: update_for_task is async-dispatched; reads run in sync code (flows, the CLI)
    store: ResultStore = get_result_store().update_for_task(_RECORDS, _sync=True)  # type: ignore[call-arg,assignment]
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


def is_submit_cached(request: AnyRequest, variant: int = 0) -> bool:
    """Whether this request was already submitted (and cached): re-running it is free."""
    return _store().exists(submit_cache_key(request, variant))


def cached_generation(
    request: AnyRequest, variant: int = 0
) -> tuple[RequestHandle, GptImageOutput] | None:
    """Handle and output of a request already submitted and fetched, or None."""
    handle = cached_value(submit_cache_key(request, variant))
    if not isinstance(handle, RequestHandle):
        return None
    output = cached_value(result_cache_key(handle))
    return (handle, output) if isinstance(output, GptImageOutput) else None
