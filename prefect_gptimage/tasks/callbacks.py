"""fal's webhook callbacks as records in the shared result storage, and waiting on them.

With ``PREFECT_GPTIMAGE_WEBHOOK_URL`` set, every submit carries that URL (fal's ``fal_webhook``)
and the receiver (:mod:`prefect_gptimage.webhooks`) writes each verified callback, once, to the
result storage the cache uses, under :func:`callback_key` (the validated request id). A row then
waits by reading that record (:func:`wait_for_outcome`), not by asking fal for the status; so
every worker and flow run that shares the storage (``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``)
sees it, wherever the callback landed.

**The sweep.** A row with no callback ``PREFECT_GPTIMAGE_WEBHOOK_SWEEP_AFTER`` seconds after
its submit polls fal the usual way (:meth:`~prefect_gptimage.fal.client.FalQueueClient.wait`)
and goes on as without webhooks: a lost callback, a receiver that was down or a wrong URL
delays a row but never loses it. Each swept request leaves a marker record (:func:`swept_key`),
so a run counts what it swept (:func:`count_swept`) wherever its rows ran.

The order of callback and submit record does not matter: a callback is recorded under fal's
request id whether or not a run has written its submit record yet, and a row reads it whenever
it gets there. A second callback for the same request (fal re-delivers) finds the record and
changes nothing.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prefect_gptimage.fal.client import FalQueueClient
from prefect_gptimage.schemas import GptImageOutput, RequestHandle, check_request_id
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.cache import cached_value

__all__ = [
    "FalCallback",
    "callback_key",
    "count_swept",
    "read_callback",
    "record_callback",
    "swept_key",
    "wait_for_outcome",
]

Log = logging.Logger | logging.LoggerAdapter[Any]

#: First and longest pause between two reads of a callback record, in seconds.
FIRST_READ_PAUSE, MAX_READ_PAUSE = 0.25, 5.0


class FalCallback(BaseModel):
    """One verified callback of fal, as the receiver recorded it (fal-protocol §3)."""

    model_config = ConfigDict(frozen=True)

    request_id: str = Field(description="fal's queue request id (validated: a UUID).")
    gateway_request_id: str | None = Field(
        default=None, description="The id of fal's last attempt (fal retried the request)."
    )
    status: Literal["OK", "ERROR"] = Field(description="Whether the request succeeded.")
    payload: Any = Field(default=None, description="The output (OK) or error details (ERROR).")
    error: str | None = Field(default=None, description="fal's error message (ERROR).")
    payload_error: str | None = Field(
        default=None, description="Why the payload could not be serialized (payload is null)."
    )
    received_at: datetime = Field(
        default_factory=lambda: datetime.now(timezone.utc),
        description="When the receiver verified it.",
    )

    def output(self) -> GptImageOutput | None:
        """The output it carries, if it is a success with a usable payload."""
        if self.status != "OK" or self.payload is None:
            return None
        try:
            return GptImageOutput.model_validate(self.payload)
        except ValidationError:
            return None


def callback_key(request_id: str) -> str:
    """The record key of the callback for ``request_id`` (ValueError if it is no request id)."""
    return "gptimage-callback-" + check_request_id(request_id)


def swept_key(request_id: str) -> str:
    """The record key that marks ``request_id`` as swept (polled: no callback in time)."""
    return "gptimage-swept-" + check_request_id(request_id)


def record_callback(callback: FalCallback) -> bool:
    """Record ``callback`` in the shared result storage; False if one was recorded already
    (a re-delivery: nothing changes). Serialized as submits are (``PREFECT_GPTIMAGE_LOCK_URL``).
    """
    from prefect_gptimage.tasks.queue import record_once  # the one recorded-step helper

    _, existed = record_once(callback_key(callback.request_id), lambda: callback)
    return not existed


def read_callback(request_id: str) -> FalCallback | None:
    """The recorded callback for ``request_id``, or None."""
    value = cached_value(callback_key(request_id))
    return value if isinstance(value, FalCallback) else None


def _await_callback(request_id: str, seconds: float) -> FalCallback | None:
    """Read the callback record until it is there or ``seconds`` passed (then None)."""
    deadline = time.monotonic() + seconds
    pause = FIRST_READ_PAUSE
    while True:
        found = read_callback(request_id)
        if found is not None:
            return found
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(pause, left))
        pause = min(pause * 2, MAX_READ_PAUSE)


def wait_for_outcome(
    client: FalQueueClient, handle: RequestHandle, timeout: float | None, log: Log
) -> GptImageOutput | None:
    """Wait for ``handle`` to end, by its callback when webhooks are on; then the output the
    callback carried, or None (the caller fetches the result, fal's usual path: a failed
    request raises there).

    Without ``PREFECT_GPTIMAGE_WEBHOOK_URL`` this is ``client.wait`` (polling). With it, the
    callback record is read until ``PREFECT_GPTIMAGE_WEBHOOK_SWEEP_AFTER`` seconds have passed
    since the submit (at most ``timeout`` from now; a resumed run's rows waited already); then
    the request is swept: polled, with what is left of ``timeout`` (None:
    ``PREFECT_GPTIMAGE_REQUEST_TIMEOUT``).
    """
    settings = get_settings()
    if not settings.webhook_url:
        client.wait(handle, timeout=timeout, log=log)
        return None
    timeout = timeout if timeout is not None else settings.request_timeout
    started = time.monotonic()
    patience = settings.webhook_sweep_after
    if handle.submitted_at is not None:  # the sweep delay counts from the submit
        patience = max(0.0, patience - (time.time() - handle.submitted_at))
    callback = _await_callback(handle.request_id, min(patience, timeout))
    if callback is not None:
        return callback.output()
    log.info(
        "swept %s: no callback after %.0f s, asking fal",
        handle.request_id,
        time.monotonic() - started,
    )
    from prefect_gptimage.tasks.queue import record_once

    record_once(swept_key(handle.request_id), lambda: True)
    left = max(1.0, timeout - (time.monotonic() - started))
    client.wait(handle, timeout=left, log=log)
    # the callback may have come meanwhile: its payload saves the result call
    late = read_callback(handle.request_id)
    return late.output() if late is not None else None


def count_swept(request_ids: list[str]) -> int:
    """How many of ``request_ids`` were swept (by any process sharing the result storage)."""
    return sum(1 for rid in request_ids if cached_value(swept_key(rid)) is not None)
