"""The Redis submit lock: Prefect's ``LockManager`` protocol on redis-py's ``Lock``.

With ``PREFECT_GPTIMAGE_LOCK_URL=redis://host:port/db``, each submit runs in a Prefect transaction
of isolation level ``SERIALIZABLE`` whose lock manager is a :class:`RedisSubmitLocks` (see
:mod:`prefect_gptimage.tasks.cache`): the first process to reach a request takes its lock,
submits and commits the record; any other waits for the lock, then finds the record.

The manager implements Prefect's public ``prefect.locking.protocol.LockManager`` protocol itself,
on redis-py's public ``redis.lock.Lock`` (a ``SET key token NX PX lease``, given back by a
compare-and-delete script), so it depends on neither Prefect's nor prefect-redis's internals. Its
keys are prefect-redis's (``lock:<cache key>``), so processes on either lock manager exclude each
other. What it adds:

* **A lease on every lock** (:func:`lock_lease`, 5 minutes or twice the retry budget): Prefect's
  transactions take locks without a hold timeout, and a lock that never expires would block a
  request everywhere, forever, once its holder is killed with ``kill -9``.
* **Redis restarts ridden out**: every Redis call of the lock (taking it, waiting for it, giving
  it back) is retried under the package's one :class:`~prefect_gptimage.retry.RetryPolicy` (the
  Redis rows of the retry table), the budget counted from the first failure (waiting for another
  holder is no failure). When Redis stays away longer, taking or waiting for a lock fails with
  :class:`LockServiceUnavailable` before anything is sent to fal; a lock that cannot be given
  back is only logged (its submit is recorded; its lease frees it).
* **Its own token recognised**: a SET whose reply was lost is sent again and finds the key set,
  by this very holder; it counts as taken instead of waiting out its own lease.
* **``is_locked`` of a lock held here answered without Redis**: Prefect asks before writing the
  record of a paid submit, which must not wait on Redis.
* **Picklable** (``__reduce__``): a task's cache policy travels to Dask workers and subprocesses.

Async acquires take the same synchronous lock in a worker thread: Prefect gives every lock back
with the synchronous ``release_lock``.

Example:
    >>> locks = RedisSubmitLocks("redis://localhost:6379/0", lease=300.0)
    >>> locks.lease, locks.url
    (300.0, 'redis://localhost:6379/0')
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from prefect_gptimage.errors import LockServiceUnavailable
from prefect_gptimage.retry import RetryPolicy, is_transient_redis_error
from prefect_gptimage.settings import get_settings

if TYPE_CHECKING:
    from redis import Redis
    from redis.lock import Lock

__all__ = [
    "MIN_LOCK_LEASE",
    "LockServiceUnavailable",
    "RedisSubmitLocks",
    "lock_lease",
    "redis_lock_manager",
    "without_credentials",
]

logger = logging.getLogger("prefect_gptimage.tasks.cache")

T = TypeVar("T")

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


def without_credentials(url: str) -> str:
    """``url`` fit for messages and logs: a ``user:password@`` part is cut out.

    Example:
        >>> without_credentials("redis://:s3cret@redis-host:6379/0")
        'redis://redis-host:6379/0'
    """
    scheme, sep, rest = url.partition("://")
    return scheme + sep + rest.rpartition("@")[2] if sep else url


def _lock_name(key: str) -> str:
    """The Redis key of the lock of a record (prefect-redis's naming, so the two interlock)."""
    return f"lock:{key}"


def _redis_lock_class() -> type[Lock]:
    """redis-py's ``Lock`` recognising its own token (imported on first use: the [redis] extra)."""
    try:
        from redis.lock import Lock
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "PREFECT_GPTIMAGE_LOCK_URL needs redis-py: pip install 'prefect-gptimage[redis]'"
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

    return OwnTokenLock


class RedisSubmitLocks:
    """Prefect ``LockManager`` over Redis: leased locks whose Redis calls ride out a restart.

    One instance holds the locks it took in ``held`` (by Redis key, with their holder); use
    :func:`redis_lock_manager` for one per thread, so that concurrent holders never share one.
    """

    def __init__(self, url: str, lease: float) -> None:
        try:
            from redis import Redis
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(
                "PREFECT_GPTIMAGE_LOCK_URL needs redis-py: pip install 'prefect-gptimage[redis]'"
            ) from exc
        self.url = url
        self.lease = lease
        self.client: Redis = Redis.from_url(url)
        self.held: dict[str, tuple[Lock, str]] = {}
        self._guard = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        return (RedisSubmitLocks, (self.url, self.lease))

    def __repr__(self) -> str:
        return f"RedisSubmitLocks({without_credentials(self.url)!r}, lease={self.lease})"

    # -- Redis calls, retried ----------------------------------------------------------------

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
                    f"lock service {without_credentials(self.url)} unreachable "
                    f"({exc}) trying to {what}{consequence} (PREFECT_GPTIMAGE_LOCK_URL)"
                ) from exc

        if not retry:
            return attempt()
        result: T = RetryPolicy.from_settings().retrying(budget_from_first_failure=True)(attempt)
        return result

    def _new_lock(self, name: str, lease: float) -> Lock:
        return _redis_lock_class()(self.client, name, timeout=lease, thread_local=False)

    def _take(self, lock: Lock, token: str, timeout: float | None, what: str) -> bool:
        """Take ``lock`` under ``token``, waiting ``timeout`` seconds at most (None: until
        taken) over however many retries; a retry finds a SET that went through as taken."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def acquire() -> bool:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return bool(lock.acquire(token=token, blocking_timeout=left))

        return self._redis_call(what, acquire)

    def _give_back(self, key: str, lock: Lock, token: str) -> None:
        """Delete ``lock`` in Redis if it still holds ``token``, retried. Never raises: the
        caller's submit is recorded (or was never sent), and a lock that cannot be given back
        frees when its lease ends."""
        from redis.exceptions import LockNotOwnedError

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

    # -- prefect.locking.protocol.LockManager --------------------------------------------------

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        """Take the lock of ``key`` for ``holder``, waiting ``acquire_timeout`` seconds at most
        (None: until taken), held ``hold_timeout`` seconds at most (None: the lease)."""
        if self.is_lock_holder(key, holder):
            return True
        name = _lock_name(key)
        lock = self._new_lock(name, hold_timeout or self.lease)
        taken = self._take(lock, holder, acquire_timeout, "take the lock")
        if taken:
            with self._guard:
                self.held[name] = (lock, holder)
        return taken

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        """:meth:`acquire_lock` in a worker thread: Prefect gives locks back synchronously."""
        return await asyncio.to_thread(
            self.acquire_lock, key, holder, acquire_timeout, hold_timeout
        )

    def release_lock(self, key: str, holder: str) -> None:
        """Give back the lock of ``key`` held by ``holder`` (failures only logged). As
        prefect-redis: a lock not held here is fine if Redis holds none, and a ``ValueError``
        if another holder has it."""
        name = _lock_name(key)
        with self._guard:
            entry = self.held.get(name)
            mine = entry is not None and entry[1] == holder
            if mine:
                del self.held[name]
        if entry is not None and mine:
            self._give_back(key, entry[0], holder)
            return
        try:
            locked = self.is_locked(key)
        except LockServiceUnavailable as exc:
            logger.warning("submit lock %s not checked on release (%s)", key, exc)
            return
        if locked:
            raise ValueError(f"No lock held by {holder} for transaction with key {key}")

    def is_locked(self, key: str) -> bool:
        """Whether the record ``key`` is locked. Prefect asks before each write. A lock held
        here is locked, without asking Redis: the record of a paid submit, written under its own
        lock, must not wait on Redis. Other keys (the random keys of failure records) are asked
        once, not retried: a row that could not take its lock would otherwise fail after twice
        the budget, and Prefect only skips that write, with a warning."""
        name = _lock_name(key)
        if name in self.held:
            return True
        lock = self._new_lock(name, self.lease)
        return self._redis_call("check the lock", lock.locked, unsent=False, retry=False)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        """Whether ``holder`` holds the lock of ``key`` through this manager (no Redis call)."""
        entry = self.held.get(_lock_name(key))
        return entry is not None and entry[1] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until the lock of ``key`` is free (``timeout`` seconds at most; None: no limit).

        Waits by taking the lock, under a lease and a token of its own (a retry must recognise
        this wait's own SET, as :meth:`acquire_lock` does), and giving it back at once."""
        lock = self._new_lock(_lock_name(key), self.lease)
        token = uuid.uuid4().hex
        freed = self._take(lock, token, timeout, "wait for the lock")
        if freed:
            self._give_back(key, lock, token)
        return freed

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """:meth:`wait_for_lock` in a worker thread."""
        return await asyncio.to_thread(self.wait_for_lock, key, timeout)


_managers = threading.local()


def redis_lock_manager(url: str, lease: float | None = None) -> RedisSubmitLocks:
    """The lock manager for ``url`` (one per thread, so concurrent holders never share one).

    Example:
        >>> redis_lock_manager("redis://localhost:6379/0").lease
        300.0
    """
    lease = lock_lease() if lease is None else lease
    cache: dict[tuple[str, float], RedisSubmitLocks] = getattr(_managers, "cache", None) or {}
    _managers.cache = cache
    if (url, lease) not in cache:
        cache[url, lease] = RedisSubmitLocks(url, lease)
    return cache[url, lease]
