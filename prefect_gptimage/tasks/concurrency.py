"""Cap the fal requests in flight: a Prefect global concurrency limit, or a local one.

fal counts only running requests against an account's limit and queues the rest, so sending
more than the limit only makes requests wait in fal's queue (and costs status polls). Every
:func:`~prefect_gptimage.tasks.generate_images` holds one slot from its submit until its result
is fetched (not while downloading, and not at all for a cached request). A local slot is given
back as soon as fal reports the request completed (:func:`fal_completed`, called by the fetch
task between its wait and its result): the next request is submitted while this one's result
is read, instead of after.

* If a Prefect **global concurrency limit** named ``PREFECT_GPTIMAGE_CONCURRENCY_LIMIT_NAME``
  (default ``fal-gpt-image``) exists, slots come from it: the cap holds across every task, flow
  run and worker talking to that Prefect API. Create it once with::

      prefect gcl create fal-gpt-image --limit 16

  (set the limit to your fal account's concurrency: 2 for new accounts, up to 40).
* Otherwise a process-local semaphore of ``PREFECT_GPTIMAGE_LOCAL_CONCURRENCY`` (default 16) caps
  the requests of this process.

**Look-ahead.** When the local cap equals the fal account's limit, each request that finishes
leaves its slot idle at fal until this process notices (a status poll), fetches the result and
submits the next one. ``lookahead`` (``PREFECT_GPTIMAGE_LOOKAHEAD``, a batch's ``lookahead``)
keeps that many more requests submitted, waiting in fal's queue, so fal starts the next one the
instant a slot frees. fal bills a request only once it runs, and a queued request is cached
like any submit. fal runs at most the account's limit at once, so the cap's promise (never more
requests *running* at fal than the cap) holds when the cap is the account's limit; with a cap
below the account's limit, a look-ahead raises the running count to cap + lookahead, so leave it
at 0 there. It applies to the local cap only: a global limit is the cap across workers, as is.

**A global slot is a lease** of ``PREFECT_GPTIMAGE_SLOT_LEASE`` seconds (default 60, the least
the Prefect server accepts). While held, Prefect's own renewal thread renews it every 3/4 of the
lease, so a request that runs for minutes keeps its slot; a worker killed with ``kill -9`` stops
renewing, and the server's repossessor gives its slot back within the lease plus its loop (15 s
by default), instead of Prefect's default 300 s. A renewal that fails for good (the server away
for minutes, or a server restarted with in-memory lease storage, which forgets every lease) is
logged and the request goes on: it is running at fal already, and cutting its wait short would
not stop it there.

**The Prefect server restarting or failing** (connection refused, 5xx) while a slot is taken or
given back is retried under the package's one :class:`~prefect_gptimage.retry.RetryPolicy`
(``PREFECT_GPTIMAGE_RETRY_BUDGET``, counted from the first failure: a wait for a free slot is
not a failure). A slot that cannot be taken within the budget fails the row before anything is
sent to fal (:class:`PrefectApiUnavailable`); one that cannot be given back is logged, and frees
when its lease ends. The lookup of the limit itself never falls back to the per-process cap
because the server is briefly away: that would run more requests at fal than the limit.

**Public API only.** A global slot is Prefect's public ``prefect.concurrency.sync.concurrency``
context manager (taking it, renewing its lease, giving it back, and the events), each attempt
at entering it wrapped by the retry policy. It gives a slot back in one try and does not tell
its lease id; the retry of a failed release needs that id, which Prefect records in the public
``ConcurrencyContext.cleanup_lease_ids`` when the slot is granted (seen in 3.8.8 and 3.9.1). On
Prefect 3.6 and 3.7 (3.7.8) it is not recorded, so there a release that fails (the server away
at that very moment) is not retried: it is logged, and the slot frees when its lease ends
(lease plus the server's 15 s loop), as for a killed worker. A release that fails emits no
"released" event either.

Example:
    >>> with fal_request_slot():
    ...     handle = client.submit(request)
    ...     client.wait(handle)
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import TypeVar
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.concurrency.context import ConcurrencyContext
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from prefect_gptimage.errors import PrefectApiUnavailable
from prefect_gptimage.retry import RetryPolicy, is_transient_prefect_api_error
from prefect_gptimage.settings import get_settings

T = TypeVar("T")

logger = logging.getLogger("prefect_gptimage.tasks.concurrency")

#: How long the answer "does the global limit exist?" is trusted.
LOOKUP_TTL = 60.0

_lock = threading.Lock()
_semaphores: dict[int, threading.BoundedSemaphore] = {}
_lookups: dict[str, tuple[bool, float]] = {}


def _api_call(what: str, call: Callable[[], T]) -> T:
    """``call()`` (one Prefect API call about the global limit), its transient failures retried
    under :meth:`RetryPolicy.from_settings`, the budget counted from the first failure."""

    def attempt() -> T:
        try:
            return call()
        except Exception as exc:
            if not is_transient_prefect_api_error(exc):
                raise
            cause = exc.__cause__ or exc
            raise PrefectApiUnavailable(
                f"Prefect API: could not {what}: {type(cause).__name__}: {cause or exc}"
            ) from exc

    result: T = RetryPolicy.from_settings().retrying(budget_from_first_failure=True)(attempt)
    return result


def _read_limit_active(name: str) -> bool:
    try:
        with get_client(sync_client=True) as client:
            return bool(client.read_global_concurrency_limit_by_name(name).active)
    except ObjectNotFound:
        return False


def global_limit_exists(name: str) -> bool:
    """Whether the Prefect API has an active global concurrency limit ``name`` (cached 60 s).

    A server that is briefly away (restarting) is asked again within the retry budget, then
    :class:`PrefectApiUnavailable`; only another failure (no API configured at all) falls back
    to the per-process cap, which would not bound the requests of other workers.
    """
    with _lock:
        known = _lookups.get(name)
        if known is not None and time.monotonic() - known[1] < LOOKUP_TTL:
            return known[0]
    try:
        exists = _api_call(
            f"look up the global concurrency limit {name!r}", lambda: _read_limit_active(name)
        )
    except PrefectApiUnavailable:
        raise
    except Exception as exc:  # no API reachable: fall back to the local cap
        logger.debug("global concurrency limit lookup failed: %s", exc)
        exists = False
    with _lock:
        _lookups[name] = (exists, time.monotonic())
    return exists


def forget_lookups() -> None:
    """Drop cached lookups (after creating or deleting a limit)."""
    with _lock:
        _lookups.clear()


def local_cap(local_limit: int | None = None, lookahead: int | None = None) -> tuple[int, int]:
    """(cap, look-ahead) of the local semaphore for a caller's ``local_limit``/``lookahead``."""
    settings = get_settings()
    size = max(1, min(settings.local_concurrency, local_limit or settings.local_concurrency))
    return size, settings.lookahead if lookahead is None else lookahead


def _local_semaphore(size: int) -> threading.BoundedSemaphore:
    with _lock:
        if size not in _semaphores:
            _semaphores[size] = threading.BoundedSemaphore(size)
        return _semaphores[size]


@contextmanager
def fal_request_slot(
    name: str | None = None,
    local_limit: int | None = None,
    lookahead: int | None = None,
) -> Iterator[str]:
    """Hold one fal request slot; yields ``"global:<name>"`` or ``"local:<size>"``.

    ``local_limit`` (e.g. a batch's ``concurrency``) lowers the local cap for this caller; it
    never raises it above ``PREFECT_GPTIMAGE_LOCAL_CONCURRENCY``. ``lookahead`` (None:
    ``PREFECT_GPTIMAGE_LOOKAHEAD``) adds that many slots to a local cap, for requests that wait
    in fal's queue (see the module docs); ``"local:16+2"`` names such a cap.
    """
    name = name or get_settings().concurrency_limit_name
    if global_limit_exists(name):
        token = _early_release.set(None)
        try:
            with global_slot(name):
                yield f"global:{name}"
        finally:
            _early_release.reset(token)
        return
    size, extra = local_cap(local_limit, lookahead)
    label = f"local:{size}+{extra}" if extra else f"local:{size}"
    held = _local_semaphore(size + extra)
    held.acquire()
    token = _early_release.set(_once(held.release))
    try:
        yield label
    finally:
        release = _early_release.get()
        _early_release.reset(token)
        if release is not None:
            release()


#: Gives back the local slot this context holds, once (see :func:`fal_completed`).
_early_release: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "prefect_gptimage_fal_slot", default=None
)


def _once(release: Callable[[], None]) -> Callable[[], None]:
    done = threading.Lock()

    def release_once() -> None:
        if done.acquire(blocking=False):
            release()

    return release_once


def fal_completed() -> bool:
    """The request whose local slot this context holds completed at fal: give the slot back now.

    Fetching its result and downloading it run nothing at fal, so the next request may start
    meanwhile; the slot's ``with`` block then gives nothing back twice. True when this context
    holds no slot from now on (so a new submit must take one); False when it holds a global slot,
    kept to the end of its block, or none was taken here.
    """
    release = _early_release.get()
    if release is None:
        return False
    release()
    return True


_ExcInfo = tuple[type[BaseException] | None, BaseException | None, TracebackType | None]


@contextmanager
def global_slot(name: str) -> Iterator[UUID | None]:
    """Hold one slot of the global concurrency limit ``name``; yields the lease id (None where
    Prefect does not tell it: 3.6, 3.7).

    Prefect's public ``prefect.concurrency.sync.concurrency(name, occupy=1, strict=True)``, with
    a lease of ``PREFECT_GPTIMAGE_SLOT_LEASE`` seconds that Prefect renews in the background (a
    renewal that fails for good is logged, not raised), and with taking the slot retried through
    a Prefect server restart (see the module docs). Raises :class:`PrefectApiUnavailable` when no
    slot could be taken within the retry budget (nothing is sent to fal then), and Prefect's
    ``ConcurrencySlotAcquisitionError`` at once when the limit does not exist.

    Giving the slot back: the public context manager tries once and raises on failure. That
    failure is caught here; the release is then retried under the same policy through the
    public client's ``release_concurrency_slots_with_lease``, for which the lease id is needed.
    Prefect 3.8.8 and 3.9 record it, when the slot is granted, in the ``cleanup_lease_ids`` of
    the active ``prefect.concurrency.context.ConcurrencyContext`` (one is entered here); 3.6 and
    3.7 do not, so there a slot that could not be given back is only logged, and frees when its
    lease ends (within the lease plus the server's 15 s loop). Either way the row is not
    failed: its result is in hand.
    """
    lease = get_settings().slot_lease
    with ConcurrencyContext() as leases:
        slot = _api_call(
            f"take a slot of the global concurrency limit {name!r}; nothing was submitted",
            lambda: _enter(
                concurrency(
                    name,
                    occupy=1,
                    lease_duration=lease,
                    strict=True,
                    raise_on_lease_renewal_failure=False,
                )
            ),
        )
        # the last one granted (this context is new): a lease granted to an attempt that failed
        # after all is left to the context's exit, which releases it
        lease_id = leases.cleanup_lease_ids[-1] if leases.cleanup_lease_ids else None
        try:
            yield lease_id
        except BaseException:
            _give_back(slot, sys.exc_info(), name, lease_id, leases)
            raise
        else:
            _give_back(slot, (None, None, None), name, lease_id, leases)


def _enter(manager: AbstractContextManager[None]) -> AbstractContextManager[None]:
    """Enter ``manager`` (one try at taking a slot); returns it, to be left by _give_back."""
    manager.__enter__()
    return manager


def _release_lease(lease_id: UUID) -> None:
    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(lease_id=lease_id)


def _give_back(
    slot: AbstractContextManager[None],
    exc_info: _ExcInfo,
    name: str,
    lease_id: UUID | None,
    leases: ConcurrencyContext,
) -> None:
    """Leave ``slot`` (Prefect gives the slot back, once); a failure is retried by lease id
    when known, else logged. Never raises: the slot frees when its lease ends anyway."""
    lease = get_settings().slot_lease
    failure: Exception
    try:
        slot.__exit__(*exc_info)
        return
    except Exception as exc:  # the release failed (Prefect raised it out of its finally)
        failure = exc
    if lease_id is not None:
        if lease_id in leases.cleanup_lease_ids:  # handled here, not again by the context's exit
            leases.cleanup_lease_ids.remove(lease_id)
        if is_transient_prefect_api_error(failure):
            try:
                _api_call(
                    f"give back a slot of the global concurrency limit {name!r}",
                    lambda: _release_lease(lease_id),
                )
                return
            except Exception as exc:
                failure = exc
    # the row's result is in hand: do not fail it for this
    logger.warning(
        "could not give back a slot of the global concurrency limit %r (%s: %s); the slot "
        "frees when its lease ends (within %.0f s)",
        name,
        type(failure).__name__,
        failure,
        lease + 15,
    )
