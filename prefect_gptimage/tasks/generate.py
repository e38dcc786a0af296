"""The whole path for one request: submit → wait → fetch → download, as one task or one call.

:func:`generate` is the composition, in plain calls: each paid step writes the same cache record
as its task (:func:`~prefect_gptimage.tasks.queue.submit_recorded`,
:func:`~prefect_gptimage.tasks.queue.fetch_recorded`), committed the moment it returns, and a
cache hit is read straight from the result store. :func:`generate_images` is the Prefect task
around it (one task run per request) and :func:`agenerate_images` its async twin. How a request is
generated (where files go, deadline, cache behaviour) is one frozen
:class:`~prefect_gptimage.tasks.options.GenerationOptions`.

Example:
    >>> from prefect import flow
    >>> @flow
    ... def kites() -> list[str]:
    ...     return [i.path for i in generate_images(GptImageRequest(prompt="a kite")).images]
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from prefect_gptimage.errors import (
    DuplicateRequestId,
    FalError,
    ImageCountMismatch,
    PaidRequestFailed,
    PermanentFalError,
    RowInterrupted,
)
from prefect_gptimage.inputs import resolve_inputs
from prefect_gptimage.ledger import claim_request_id
from prefect_gptimage.retry import resubmit_reason
from prefect_gptimage.schemas import (
    AnyRequest,
    GenerationResult,
    GptImageOutput,
    RequestHandle,
    check_image_count,
)
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks._twin import async_twin
from prefect_gptimage.tasks.cache import cached_generation, request_fingerprint
from prefect_gptimage.tasks.concurrency import fal_completed, fal_request_slot
from prefect_gptimage.tasks.download import download, download_image
from prefect_gptimage.tasks.intents import NEEDS_SLOT, submit_fate, unresolved_intent
from prefect_gptimage.tasks.options import GenerationOptions
from prefect_gptimage.tasks.queue import fetch_recorded, submit_recorded

__all__ = [
    "IN_FLIGHT",
    "NOT_STARTED",
    "RowInterrupted",
    "agenerate_images",
    "expired",
    "generate",
    "generate_images",
    "paid_for",
]


#: ``error_type`` of a request (a row) a stop kept from being submitted: nothing was paid.
NOT_STARTED = "not_started_interrupted"
#: ``error_type`` of a row a stop left running at fal: a re-run resumes it without paying again.
IN_FLIGHT = "in_flight_interrupted"


def not_started(what: str = "nothing was submitted for it") -> RowInterrupted:
    """The error of a row (or a row's next request) a stop kept from starting."""
    return RowInterrupted(f"not started (interrupted): {what}", error_type=NOT_STARTED)


#: fal's errors that come after fal ran (or accepted) the request, so it is billed: the row
#: fails, and its request still counts as paid.
BILLED_ERRORS = (ImageCountMismatch, DuplicateRequestId)


class Accepted:
    """The request fal accepted for one generation, once it did: its id, and whether this run
    paid for it (not cached, not paid by an earlier run)."""

    def __init__(self) -> None:
        self.request_id: str | None = None
        self.paid = False
        #: requests this row paid for besides the last one (see GenerationResult.also_paid)
        self.also_paid = 0

    def note(self, handle: RequestHandle, cached: bool) -> None:
        self.request_id, self.paid = handle.request_id, self.paid or not cached


@contextmanager
def paid_for(accepted: Accepted, where: str | None = None) -> Iterator[None]:
    """Failures inside, once fal accepted the request, raise :class:`PaidRequestFailed` (the
    request id, whether this run paid, the error): the run's summary still counts what was paid.
    ``where``: the folder files are written to, named by a file error that names no path.

    fal's own errors (a :class:`~prefect_gptimage.errors.FalError`) pass unchanged: they carry
    their request id already, and callers catch them by type. Those that come after fal billed
    the request (:data:`BILLED_ERRORS`: a wrong image count, an id answered twice) are marked
    ``paid`` when this run paid for it, so the summary still counts the payment."""
    try:
        yield
    except PaidRequestFailed:
        raise
    except BILLED_ERRORS as exc:
        if accepted.request_id is not None and exc.request_id in (None, accepted.request_id):
            exc.request_id = accepted.request_id
            exc.paid = exc.paid or accepted.paid
        raise
    except FalError:
        raise
    except Exception as exc:
        if accepted.request_id is None:
            raise
        error: BaseException = exc
        if isinstance(exc, OSError) and exc.filename is None and where is not None:
            error = type(exc)(exc.errno, f"{exc.strerror or exc} (writing under {where})")
        raise PaidRequestFailed(error, accepted.request_id, accepted.paid) from exc


def _submit_and_fetch(
    request: AnyRequest, options: GenerationOptions, accepted: Accepted | None = None
) -> tuple[RequestHandle, GptImageOutput, bool]:
    """The paid steps as recorded plain calls under a fal request slot: (handle, output, was
    cached). Each step's record is committed the moment it returns (see
    :func:`~prefect_gptimage.tasks.queue.submit_recorded`)."""
    log = get_run_logger()
    refresh = options.refresh_cache
    timeout = options.timeout or get_settings().request_timeout  # every wait has a deadline
    with ExitStack() as slot:
        held = False

        def hold() -> None:
            """A fal slot, from submit to fetched result."""
            nonlocal held
            if not held:
                slot.enter_context(
                    fal_request_slot(local_limit=options.max_in_flight, lookahead=options.lookahead)
                )
                held = True

        fate = submit_fate(
            request,
            options.variant,
            resubmit_unknown=options.resubmit_unknown,
            refresh=refresh,
        )
        if fate in NEEDS_SLOT:  # cached, or unknown (fails unsent): no slot before the submit
            hold()
        # resubmit_unknown: an earlier submit of it may have been billed; this one is paid too
        earlier_unknown = (
            fate == "to_pay"
            and options.resubmit_unknown
            and not refresh
            and unresolved_intent(request, options.variant) is not None
        )
        paid_before = False  # the previous attempt was billed (its result expired at fal)
        for attempt in range(options.resubmits + 1):
            if (attempt or fate == "to_pay") and _stopped(options):  # a new submit: not now
                raise not_started("a stop came before its submit: nothing was paid")
            handle, cached = submit_recorded(
                request,
                options.credentials,
                options.variant,
                resubmit_unknown=options.resubmit_unknown,
                refresh=refresh,
                retention=options.retention(),
                budget_wait=options.budget_wait,
            )
            cached = cached and handle.request_id not in options.paid_in_run
            if accepted is not None:
                if paid_before and not cached:  # a fresh submit after one fal expired (billed)
                    accepted.also_paid += 1
                accepted.note(handle, cached)
                if earlier_unknown and not cached and not attempt:
                    accepted.also_paid += 1
                    log.warning(
                        "paid twice, possibly: %s was submitted again (resubmit_unknown); fal "
                        "may have billed its earlier submit too, counted as paid",
                        handle.request_id,
                    )
            hold()
            try:
                output, _ = fetch_recorded(handle, options.credentials, timeout=timeout)
                _note_delivering(options, request)
                return handle, output, cached
            except Exception as exc:
                reason = resubmit_reason(exc)
                if reason is not None and expired(exc) and not _resubmit_expired(options):
                    raise PermanentFalError(
                        f"{exc}. fal expired the result of {handle.request_id}: not submitted "
                        "again (resubmit_expired is off), so nothing is paid twice",
                        status_code=404,
                        request_id=handle.request_id,
                    ) from exc
                if reason is None or attempt == options.resubmits:
                    raise
                paid_before = expired(exc)
                if expired(exc):
                    log.warning(
                        "paid twice: fal expired the result of %s (%s); submitting it again",
                        handle.request_id,
                        reason,
                    )
                else:
                    log.warning("submitting %s again: %s", handle.request_id, reason)
                # the new submit needs a local slot: the old one was given back when fal
                # completed the request, or is now (a failed request runs nothing at fal either)
                if fal_completed():
                    held = False
                    hold()
                refresh = True
    raise AssertionError("unreachable")  # pragma: no cover


def _stopped(options: GenerationOptions) -> bool:
    return bool(options.stop is not None and options.stop.requested)


def _note_delivering(options: GenerationOptions, request: AnyRequest) -> None:
    """Tell the run's stop that this row has its result (a stop gives it time to stage it)."""
    note = getattr(options.stop, "note_delivering", None)
    if note is not None:
        note(request_fingerprint(request, options.variant))


def expired(exc: BaseException) -> bool:
    """fal no longer knows a request it accepted (404): its result expired, or was never kept.

    A fresh submit pays for the request again ("paid twice: fal expired the result").
    """
    return isinstance(exc, PermanentFalError) and exc.status_code == 404


def _resubmit_expired(options: GenerationOptions) -> bool:
    if options.resubmit_expired is not None:
        return options.resubmit_expired
    return get_settings().resubmit_expired


def generate(request: AnyRequest, options: GenerationOptions | None = None) -> GenerationResult:
    """Submit, wait, fetch and download one request (call inside a flow or task).

    Every step is a plain call (the paid ones recorded in the cache as their tasks are), so a
    task calling this is one task run; ``download_tasks=True`` downloads each image as its own
    task run. ``max_in_flight`` lowers the local cap on fal requests (see
    :mod:`prefect_gptimage.tasks.concurrency`).

    An edit naming local files or ``s3://`` objects has them read, checked and sent inline as
    ``data:`` URIs first (the flows stage them to their bucket instead; see
    :mod:`prefect_gptimage.inputs`): a bad input raises before anything is paid.
    """
    options = options or GenerationOptions()
    if getattr(request, "unresolved_inputs", None):
        request = resolve_inputs(request)
    return _generate(request, options, Accepted())


def _generate(
    request: AnyRequest, options: GenerationOptions, accepted: Accepted
) -> GenerationResult:
    """:func:`generate`, noting in ``accepted`` the request fal accepted; any failure after
    that raises :class:`PaidRequestFailed`."""
    dest = str(Path(options.output_dir or get_settings().output_dir))
    with paid_for(accepted, dest):
        cached = None if options.refresh_cache else cached_generation(request, options.variant)
        if cached is not None:
            (handle, output), from_cache = cached, True
            accepted.note(handle, cached=True)
            _note_delivering(options, request)
        else:
            handle, output, from_cache = _submit_and_fetch(request, options, accepted)
        claim_request_id(handle.request_id, request, options.variant)  # one request id, one row
        step: Any = download_image if options.download_tasks else download
        images = [
            step(image, request, handle.request_id, i, dest)
            for i, image in enumerate(output.images)
        ]
        check_image_count(request, output, request_id=handle.request_id, images=images)
    return GenerationResult(
        handle=handle,
        request=request,
        output=output,
        images=images,
        from_cache=from_cache,
        also_paid=accepted.also_paid,
    )


GENERATE_OPTIONS: dict[str, Any] = {
    "name": "gptimage-generate",
    "task_run_name": "generate {request.endpoint}",
    "cache_policy": NO_CACHE,
}


@task(**GENERATE_OPTIONS)
def generate_images(
    request: AnyRequest, options: GenerationOptions | None = None
) -> GenerationResult:
    """The whole path for one request: submit → wait → fetch result → download each image.

    One task run: its steps are plain calls, the paid ones cached under their tasks' keys. A
    request that fails at fal with a server-side error (not billed) is submitted anew up to
    ``options.resubmits`` times. So is one
    whose result fal expired (404), which pays for it twice: logged as "paid twice: fal expired
    the result", and off with ``resubmit_expired=False``. A submit whose outcome is unknown
    (possibly billed) fails without paying again unless ``resubmit_unknown``. Any other failure
    fails at once with fal's message.

    Example:
        >>> result = generate_images(GptImageRequest(prompt="a kite", num_images=2))
        >>> [(i.path, i.width, i.height, i.sha256) for i in result.images]
    """
    return generate(request, options)


agenerate_images = task(**GENERATE_OPTIONS)(async_twin(generate_images.fn))
