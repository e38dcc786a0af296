"""Submit intents: a durable note, written *before* the billable submit, that it may have happened.

fal's queue API has no idempotency key, so a submit whose answer is lost (a dropped connection, a
2xx without a request id, a process killed while waiting for the answer) may have been enqueued
and billed. The submit cache record (:mod:`prefect_gptimage.tasks.cache`) only exists once the
answer came back; without it, the next run would pay again. So every submit follows this
protocol, in the same result store as the cache records, keyed by the request's fingerprint
(:func:`~prefect_gptimage.tasks.cache.request_fingerprint`):

1. before the submit, the intent is written ``submitting``;
2. the submit;
3. after it, the intent becomes ``submitted`` with the handle, and the submit task's cache record
   (the handle) is committed as the task completes.

fal's answer is checked against the store first: its request id is claimed for this request
(:func:`claim_in_store`, a record keyed by the id). An id the store already holds for another
request (fal answering with an id it gave before, in this run or an earlier one) is a protocol
error: the row fails with :class:`~prefect_gptimage.errors.DuplicateRequestId`, counted as paid
(fal accepted its submit) with its outcome unknown (the intent says ``unknown``), and the id is
never used for it: the other request's recorded result is never read as this one's.

An error that proves nothing was enqueued (a connect error, a 4xx at submit, a retry budget spent
on 429s) marks the intent ``not_submitted``. A
:class:`~prefect_gptimage.errors.SubmitOutcomeUnknown` from the client (or an error the client did
not classify) marks it ``unknown``. A crash anywhere leaves it as it was.

On the next submit of the same request (its cache record missing):

* ``submitted``: the recorded handle is resumed; nothing is paid;
* ``submitting`` or ``unknown``: *outcome unknown, possibly billed*: the submit fails with
  :class:`~prefect_gptimage.errors.SubmitOutcomeUnknown` and is not sent, unless the caller asks
  to resubmit (``resubmit_unknown=True``, CLI ``--resubmit-unknown``, or ``refresh_cache=True``);
* ``not_submitted`` or no intent: submitted.

:func:`submit_fate` is the one answer to "what happens to this request if it runs now" (cached,
resumed at fal, outcome unknown and not sent, or paid): the batch's plan, the dry run and the
generate path's "does it take a fal slot" all ask it (see :mod:`prefect_gptimage.engine.plan`).

Example:
    >>> from prefect_gptimage.schemas import GptImageRequest
    >>> intent_key(GptImageRequest(prompt="a kite")).startswith("gptimage-intent-")
    True
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal, NamedTuple, cast

from prefect.logging import get_logger
from prefect.results import ResultStore, default_cache
from pydantic import BaseModel, ValidationError

from prefect_gptimage.errors import DuplicateRequestId, GptImageError, SubmitOutcomeUnknown
from prefect_gptimage.ledger import claim_request_id
from prefect_gptimage.schemas import AnyRequest, RequestHandle
from prefect_gptimage.tasks import cache

__all__ = [
    "NEEDS_SLOT",
    "OUTCOME_UNKNOWN",
    "Fate",
    "FateStores",
    "SubmitIntent",
    "claim_in_store",
    "fate_stores",
    "guarded_submit",
    "intent_key",
    "outcome_unknown",
    "read_intent",
    "submit_fate",
    "unresolved_intent",
    "withdraw_submit",
    "write_intent",
]

logger = get_logger("prefect_gptimage.intents")

#: ``error_type`` of the :class:`SubmitOutcomeUnknown` raised for a row whose submit may have been
#: billed (it shows in the run summary and the manifest).
OUTCOME_UNKNOWN = "submit_outcome_unknown"

IntentState = Literal["submitting", "submitted", "unknown", "not_submitted"]
#: States that leave the submit's outcome unknown: the request may have been enqueued and billed.
UNRESOLVED: frozenset[str] = frozenset({"submitting", "unknown"})


class SubmitIntent(BaseModel):
    """The durable record of one submit of a request (stored as a plain dict)."""

    state: IntentState
    fingerprint: str
    endpoint: str
    written_at: float
    host: str
    pid: int
    handle: RequestHandle | None = None
    reason: str | None = None

    @property
    def unresolved(self) -> bool:
        """True when the submit's outcome is unknown (it may have been enqueued and billed)."""
        return self.state in UNRESOLVED

    def describe(self) -> str:
        """What happened to this submit, for an error message."""
        when = datetime.fromtimestamp(self.written_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        if self.state == "unknown":
            return f"the submit at {when} UTC: {self.reason}"
        return (
            f"a submit started at {when} UTC by {self.host} (pid {self.pid}) recorded no answer: "
            "the process stopped (or is still running) between sending it and storing fal's reply"
        )


def intent_key(request: AnyRequest, variant: int = 0) -> str:
    """The result-store key of the submit intent of this request."""
    return "gptimage-intent-" + cache.request_fingerprint(request, variant)


def _store(records: ResultStore | None = None) -> ResultStore:
    """The cache records' store (``records``, else resolved now), read and written without
    Prefect's in-memory copy (another process may have changed an intent since)."""
    return (records or cache._store()).model_copy(
        update={"cache_result_in_memory": False, "cache": default_cache()}
    )


class FateStores(NamedTuple):
    """The stores :func:`submit_fate` reads, resolved once for many requests: resolving them
    is a call on Prefect's event loop, which a 200-row plan otherwise made 400 times."""

    records: ResultStore  # the cache records (submits, results)
    intents: ResultStore  # the same store, without Prefect's in-memory copy


def fate_stores() -> FateStores:
    """The current run's :class:`FateStores`."""
    records = cache._store()
    return FateStores(records, _store(records))


def read_intent(
    request: AnyRequest, variant: int = 0, *, store: ResultStore | None = None
) -> SubmitIntent | None:
    """The submit intent of this request, or None (none, expired or unreadable). ``store``:
    the intents' store (:attr:`FateStores.intents`) when it is resolved already."""
    value = cache.read_record(store or _store(), intent_key(request, variant))
    if value is None:
        return None
    try:
        return SubmitIntent.model_validate(value)
    except (ValidationError, ValueError, TypeError):
        return None


def unresolved_intent(request: AnyRequest, variant: int = 0) -> SubmitIntent | None:
    """The intent of this request when its submit's outcome is unknown, else None."""
    intent = read_intent(request, variant)
    return intent if intent is not None and intent.unresolved else None


def write_intent(
    request: AnyRequest,
    variant: int,
    state: IntentState,
    *,
    handle: RequestHandle | None = None,
    reason: str | None = None,
) -> SubmitIntent:
    """Write (replace) the intent of this request; it expires with the cache records."""
    intent = SubmitIntent(
        state=state,
        fingerprint=cache.request_fingerprint(request, variant),
        endpoint=request.endpoint,
        written_at=time.time(),
        host=socket.gethostname(),
        pid=os.getpid(),
        handle=handle,
        reason=reason,
    )
    _store().write(
        obj=intent.model_dump(mode="json"),
        key=intent_key(request, variant),
        # a stdlib datetime: the record's metadata validates it into Prefect's DateTime
        expiration=cast(Any, datetime.now(timezone.utc) + cache.CACHE_EXPIRATION),
    )
    return intent


def withdraw_submit(request: AnyRequest, variant: int, reason: str) -> None:
    """Record that this request, submitted, was cancelled at fal before it ran: nothing was paid,
    so the next run submits it anew (its submit record expires now; its intent says
    ``not_submitted`` with ``reason``).

    A crash between the two writes leaves the handle of a cancelled request recorded: the next run
    resumes it and the row fails with fal's "cancelled", never paying twice.
    """
    handle = cache.cached_value(cache.submit_cache_key(request, variant))
    if handle is not None:  # through the submit records' own store (and its in-memory copy)
        cache._store().write(
            obj=handle,
            key=cache.submit_cache_key(request, variant),
            expiration=cast(Any, datetime.now(timezone.utc)),
        )
    write_intent(request, variant, "not_submitted", reason=reason)


#: What running a request now does: ``cached`` (free, nothing sent), ``at_fal`` (its submit is
#: recorded, not cached: resumed, nothing paid again), ``unknown`` (an earlier submit's outcome is
#: unknown: not sent, fails "possibly billed"), ``to_pay`` (submitted now: paid).
Fate = Literal["cached", "at_fal", "unknown", "to_pay"]
#: The fates whose request runs at fal during this run, so holds a fal slot.
NEEDS_SLOT: frozenset[str] = frozenset({"at_fal", "to_pay"})


def submit_state(request: AnyRequest, variant: int = 0) -> str | None:
    """Where this request's submit stands, as recorded: the one answer to "is a submit midway".

    None when it was never sent (or is known not to have been); ``"submitting"`` while it was sent
    and fal's answer is not recorded yet, and also when the store cannot be read (assume the
    worst: a caller waits for it, within its own bound, rather than leave a paid request half
    recorded); else the intent's state (``"submitted"``, ``"unknown"``).
    """
    try:
        intent = read_intent(request, variant)
    except Exception:
        return "submitting"
    if intent is None or intent.state == "not_submitted":
        return None
    return intent.state


def submit_fate(
    request: AnyRequest,
    variant: int = 0,
    *,
    resubmit_unknown: bool = False,
    refresh: bool = False,
    stores: FateStores | None = None,
) -> Fate:
    """What running ``request`` now does (see :data:`Fate`), read from the cache and the intent.

    ``refresh`` submits anew whatever is recorded; ``resubmit_unknown`` submits a request whose
    earlier submit's outcome is unknown. The same rules as :func:`guarded_submit` and the cached
    submit: this only predicts them. ``stores``: :func:`fate_stores`, when asking for many.
    """
    if refresh:
        return "to_pay"
    if cache.is_submit_cached(request, variant, store=stores.records if stores else None):
        return "cached"
    intent = read_intent(request, variant, store=stores.intents if stores else None)
    if intent is None:
        return "to_pay"
    if intent.state == "submitted" and intent.handle is not None:
        return "at_fal"
    if intent.unresolved and not resubmit_unknown:
        return "unknown"
    return "to_pay"


def outcome_unknown(intent: SubmitIntent) -> SubmitOutcomeUnknown:
    """The error for a request whose earlier submit may have been enqueued and billed."""
    return SubmitOutcomeUnknown(
        f"outcome unknown, possibly billed: {intent.describe()}. It is not submitted again: "
        "check fal's dashboard, then run with resubmit_unknown=True (CLI --resubmit-unknown) "
        "or refresh_cache=True (--refresh) to submit it anew.",
        error_type=OUTCOME_UNKNOWN,
    )


def guarded_submit(
    request: AnyRequest,
    variant: int,
    submit: Callable[[], RequestHandle],
    *,
    resubmit_unknown: bool = False,
    refresh: bool = False,
    note: str | None = None,
) -> RequestHandle:
    """``submit()`` under the intent protocol (see the module docs).

    ``resubmit_unknown``: submit even when an earlier submit's outcome is unknown. ``refresh``
    (the task's ``refresh_cache``): submit anew whatever the intent says. ``note``: kept with
    the handle, and logged when a later submit resumes it (e.g. who submitted it ahead).
    """
    earlier = None if refresh else read_intent(request, variant)
    if earlier is not None:
        if earlier.state == "submitted" and earlier.handle is not None:
            logger.info(
                "resuming %s: %s",
                earlier.handle.request_id,
                earlier.reason or "submitted earlier, but the run stopped before caching it",
            )
            return earlier.handle
        if earlier.unresolved and not resubmit_unknown:
            raise outcome_unknown(earlier)
        if earlier.unresolved:
            logger.warning("submitting again a request whose earlier submit may have been billed")
    write_intent(request, variant, "submitting")  # if this fails, nothing is sent
    try:
        handle = submit()
    except SubmitOutcomeUnknown as exc:
        _record(request, variant, "unknown", exc.message.split(". ", 1)[0])  # not its advice
        raise SubmitOutcomeUnknown(
            f"outcome unknown, possibly billed: {exc.message} A plain re-run does not submit "
            "it again (resubmit_unknown=True, CLI --resubmit-unknown, does).",
            error_type=OUTCOME_UNKNOWN,
            status_code=exc.status_code,
            request_id=exc.request_id,
        ) from exc
    except GptImageError:  # classified by the client: provably not enqueued (see retry.py)
        _record(request, variant, "not_submitted")
        raise
    except Exception as exc:  # not classified: it may have failed after fal accepted it
        reason = f"{type(exc).__name__}: {exc}"
        _record(request, variant, "unknown", reason)
        raise SubmitOutcomeUnknown(
            f"outcome unknown, possibly billed: the submit failed unexpectedly ({reason}). "
            "A plain re-run does not submit it again (resubmit_unknown=True, CLI "
            "--resubmit-unknown, does).",
            error_type=OUTCOME_UNKNOWN,
        ) from exc
    try:
        claim_in_store(request, variant, handle)
    except DuplicateRequestId:
        _record(request, variant, "unknown", f"fal answered with {handle.request_id}, not its own")
        raise
    _record(request, variant, "submitted", note, handle=handle)
    return handle


def _claim_key(request_id: str) -> str:
    """The store key of a request id's claim (ids are checked fal ids: UUIDs, safe in a key)."""
    return "gptimage-request-id-" + request_id


def claim_in_store(request: AnyRequest, variant: int, handle: RequestHandle) -> None:
    """Record ``handle.request_id`` as this request's in the store; DuplicateRequestId (marked
    paid: fal accepted this submit) when it is recorded for another request already.

    In a run the run's ledger is asked first (its DuplicateRequestId fails both rows, as for
    any id answered twice in a run). A store that cannot be read or written is logged and
    passed: the run's ledger still guards the run.
    """
    fingerprint = cache.request_fingerprint(request, variant)
    key = _claim_key(handle.request_id)
    try:
        owner = cache.read_record(_store(), key)
    except Exception as exc:
        logger.warning("could not read the claim of %s: %s", handle.request_id, exc)
        return
    if isinstance(owner, str) and owner != fingerprint:
        try:
            claim_request_id(handle.request_id, request, variant)  # the run's own rows first
        except DuplicateRequestId as exc:
            exc.paid = True
            raise
        error = DuplicateRequestId(
            f"protocol error: fal answered this submit with request id {handle.request_id}, "
            "which an earlier submit of another request recorded as its own. This request was "
            "accepted (paid) but its own id is unknown, so its outcome is unknown and the other "
            "request's result is not used; a plain re-run does not submit it again "
            "(resubmit_unknown=True, CLI --resubmit-unknown, does)",
            request_id=handle.request_id,
        )
        error.paid = True
        raise error
    if owner is None:
        try:
            _store().write(
                obj=fingerprint,
                key=key,
                expiration=cast(Any, datetime.now(timezone.utc) + cache.CACHE_EXPIRATION),
            )
        except Exception as exc:
            logger.warning("could not record the claim of %s: %s", handle.request_id, exc)


def _record(
    request: AnyRequest,
    variant: int,
    state: IntentState,
    reason: str | None = None,
    handle: RequestHandle | None = None,
) -> None:
    """Write an intent after the submit: a failure to write is logged, never hides the outcome.

    (The intent stays ``submitting`` then: unresolved, so nothing is paid twice.)
    """
    try:
        write_intent(request, variant, state, handle=handle, reason=reason)
    except Exception as exc:
        logger.warning("could not record the submit's outcome (%s): %s", state, exc)
