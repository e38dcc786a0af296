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
for at most that long. Every Redis call of the lock (taking it, waiting for it, giving it back)
rides out a Redis restart or outage shorter than ``PREFECT_GPTIMAGE_RETRY_BUDGET``, retried under
the package's one :class:`~prefect_gptimage.retry.RetryPolicy`. If Redis stays away longer, a
submit that is not cached fails with :class:`LockServiceUnavailable` before anything is sent to
fal, while a lock that cannot be given back after its submit was recorded is only logged: its
lease frees it. Without the variable there is no lock (the policy is exactly a key function, as
before).

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
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.locking.protocol import LockManager
from prefect.results import ResultStore, get_result_store
from prefect.transactions import IsolationLevel

from prefect_gptimage.errors import GptImageError
from prefect_gptimage.retry import RetryPolicy, is_transient_redis_error
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


T = TypeVar("T")


class LockServiceUnavailable(GptImageError, RuntimeError):
    """The lock service (``PREFECT_GPTIMAGE_LOCK_URL``) did not answer within the retry budget.

    Transient, like :class:`~prefect_gptimage.tasks.concurrency.PrefectApiUnavailable`: each lock
    call is retried under :meth:`RetryPolicy.from_settings` before this reaches the row. Raised
    while taking or waiting for a lock, it means nothing was submitted (its message says so).
    """

    transient = True


def _without_credentials(url: str) -> str:
    """``url`` fit for messages and logs: a ``user:password@`` part is cut out.

    Example:
        >>> _without_credentials("redis://:s3cret@redis-host:6379/0")
        'redis://redis-host:6379/0'
    """
    scheme, sep, rest = url.partition("://")
    return scheme + sep + rest.rpartition("@")[2] if sep else url


@functools.cache
def _lease_lock_class() -> type[LockManager]:
    """prefect-redis's ``RedisLockManager`` with a lease on every lock and its Redis calls
    retried (imported on first use)."""
    try:
        from prefect_redis import RedisLockManager  # type: ignore
        from redis.exceptions import LockNotOwnedError
        from redis.lock import Lock
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "PREFECT_GPTIMAGE_LOCK_URL needs prefect-redis: pip install 'prefect-gptimage[redis]'"
        ) from exc

    class OwnTokenLock(Lock):
        """A redis-py ``Lock`` that recognises its own token in Redis as taken by itself.

        Taking a lock is ``SET key token NX PX lease``. When its reply is lost (the connection
        dropped after Redis ran it), the SET is sent again, by redis-py's own client retries or by
        ours, and finds the key already set, by this very attempt. Without this check the holder
        would wait out its own lease (5 minutes) as if another held it. The token is unique per
        holder (Prefect's transaction holder is a uuid4), so a match can only be this holder:
        never two holders.
        """

        def do_acquire(self, token: str) -> bool:
            if super().do_acquire(token):
                return True
            stored = self.redis.get(self.name)
            encode = self.redis.get_encoder().encode  # bytes (str: decode_responses=True)
            return stored is not None and bool(encode(stored) == encode(token))

    class LeasedRedisLockManager(RedisLockManager):  # type: ignore
        """``RedisLockManager`` whose locks expire after ``lease`` seconds and whose Redis calls
        ride out a Redis restart shorter than ``PREFECT_GPTIMAGE_RETRY_BUDGET``.

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

        def _redis_call(
            self, what: str, call: Callable[[], T], *, unsent: bool = True, retry: bool = True
        ) -> T:
            """``call()`` (Redis calls of the lock), its transient failures (the table of
            :mod:`prefect_gptimage.retry`) retried under :meth:`RetryPolicy.from_settings`, the
            budget counted from the first failure: waiting for another holder is no failure.
            ``unsent``: the call comes before the submit, so giving up means nothing was sent.
            ``retry=False``: one try, for a check nothing depends on.
            """

            def attempt() -> T:
                try:
                    return call()
                except Exception as exc:
                    if not is_transient_redis_error(exc):
                        raise
                    consequence = "; nothing was submitted" if unsent else ""
                    raise LockServiceUnavailable(
                        f"lock service {_without_credentials(self.connection_url)} unreachable "
                        f"({exc}) trying to {what}{consequence} (PREFECT_GPTIMAGE_LOCK_URL)"
                    ) from exc

            if not retry:
                return attempt()
            result: T = RetryPolicy.from_settings().retrying(budget_from_first_failure=True)(
                attempt
            )
            return result

        def _take(self, lock: Lock, token: str, timeout: float | None, what: str) -> bool:
            """Take ``lock`` under ``token``, waiting ``timeout`` seconds at most (None: until
            taken) over however many retries; a retry finds a SET that went through as taken."""
            deadline = None if timeout is None else time.monotonic() + timeout

            def acquire() -> bool:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                return bool(lock.acquire(token=token, blocking_timeout=left))

            return self._redis_call(what, acquire)

        def _give_back(self, key: str, lock: Lock) -> None:
            """Delete ``lock`` in Redis if it still holds its token, retried. Never raises: the
            caller's submit is recorded (or was never sent), and a lock that cannot be given back
            frees when its lease ends."""
            token, lock.local.token = lock.local.token, None
            tries = 0

            def release() -> None:
                nonlocal tries
                tries += 1
                lock.do_release(token)

            try:
                self._redis_call("give the lock back", release, unsent=False)
            except LockNotOwnedError:  # gone already: the lease ran out, or Redis restarted
                if tries == 1:  # (after a retry: the earlier try may have deleted it)
                    logger.warning("submit lock %s was gone before it was given back", key)
            except LockServiceUnavailable as exc:
                logger.warning(
                    "submit lock %s not given back (%s); its lease frees it within %.0f s",
                    key,
                    exc,
                    self.lease,
                )

        def acquire_lock(
            self,
            key: str,
            holder: str,
            acquire_timeout: float | None = None,
            hold_timeout: float | None = None,
        ) -> bool:
            name = self._lock_name_for_key(key)
            if name in self._locks and self.is_lock_holder(key, holder):
                return True
            lock = OwnTokenLock(
                self.client, name, timeout=hold_timeout or self.lease, thread_local=False
            )
            taken = self._take(lock, holder, acquire_timeout, "take the lock")
            if taken:
                self._locks[name] = lock
            return taken

        async def aacquire_lock(self, *args: Any, **kwargs: Any) -> bool:
            # the sync lock, in a thread: Prefect releases locks synchronously, and prefect-redis's
            # async lock would hand that release a coroutine nobody awaits
            return await asyncio.to_thread(self.acquire_lock, *args, **kwargs)

        def release_lock(self, key: str, holder: str) -> None:
            name = self._lock_name_for_key(key)
            lock = self._locks.get(name)
            if lock is not None and self.is_lock_holder(key, holder):
                del self._locks[name]
                self._give_back(key, lock)
                return
            try:  # not held here: prefect-redis's checks (a lock held by another is an error)
                super().release_lock(key, holder)
            except LockServiceUnavailable as exc:
                logger.warning("submit lock %s not checked on release (%s)", key, exc)

        def is_locked(self, key: str) -> bool:
            # Prefect asks before each write. A lock held here is locked, without asking Redis:
            # the record of a paid submit, written under its own lock, must not wait on Redis.
            # Other keys (the random keys of failure records) are asked once, not retried: a
            # row that could not take its lock would otherwise fail after twice the budget, and
            # Prefect only skips that write, with a warning.
            if self._lock_name_for_key(key) in self._locks:
                return True
            locked: Callable[[str], bool] = super().is_locked
            return self._redis_call(
                "check the lock", lambda: locked(key), unsent=False, retry=False
            )

        def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
            # prefect-redis takes the lock to wait for it, without a lease: here with one, and a
            # token of its own (a retry must recognise this wait's own SET, as acquire_lock does)
            name = self._lock_name_for_key(key)
            lock = OwnTokenLock(self.client, name, timeout=self.lease, thread_local=False)
            freed = self._take(lock, uuid.uuid4().hex, timeout, "wait for the lock")
            if freed:
                self._give_back(key, lock)
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
