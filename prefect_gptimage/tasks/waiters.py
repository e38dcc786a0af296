"""Waiter records: a suspended flow run, and the fal requests whose callbacks it waits for.

A deployment run of the batch flow that suspends while fal works
(:mod:`prefect_gptimage.engine.suspend`) first writes, in the shared result storage the cache
and the callback records use:

* one **waiter** record under :func:`waiter_key` (its flow-run id): the request ids of the wave
  it submitted, and when it started waiting;
* one **pointer** record per request id under :func:`pointer_key`: the flow-run id that waits
  for that request's callback.

The webhook receiver (:mod:`prefect_gptimage.webhooks.resume`), after recording a callback,
follows the pointer to the waiter and resumes the run once :meth:`Waiter.ready` (every callback
recorded, or the sweep delay passed). Every record is written once (:func:`record_once`): a
resumed run that writes its waiter again gets the first one back, with its first wave's ids and
start time. A request id already pointing at another run keeps that pointer (the receiver's
periodic pass still finds the second run: see the receiver).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from prefect_gptimage.schemas import check_request_id
from prefect_gptimage.tasks.cache import cached_value
from prefect_gptimage.tasks.callbacks import read_callback

__all__ = [
    "Waiter",
    "pointer_key",
    "read_waiter",
    "waiter_key",
    "waiter_of",
    "write_waiter",
]


class Waiter(BaseModel):
    """A flow run waiting (suspended) for the callbacks of ``request_ids``."""

    model_config = ConfigDict(frozen=True)

    flow_run_id: str = Field(description="The suspended flow run (a UUID).")
    request_ids: tuple[str, ...] = Field(description="fal request ids of the wave it submitted.")
    paid: tuple[str, ...] = Field(
        default=(), description="Those of them the run paid for (not found recorded)."
    )
    created_at: datetime = Field(
        default_factory=lambda: datetime.now(timezone.utc),
        description="When it started waiting (the sweep delay counts from here).",
    )

    def missing(self) -> list[str]:
        """The request ids whose callback is not recorded yet."""
        return [rid for rid in self.request_ids if read_callback(rid) is None]

    def age(self, now: datetime | None = None) -> float:
        """Seconds since it started waiting."""
        return ((now or datetime.now(timezone.utc)) - self.created_at).total_seconds()

    def ready(
        self, sweep_after: float, missing: Sequence[str], now: datetime | None = None
    ) -> bool:
        """Whether its run should go on: every callback is recorded (``missing``, from
        :meth:`missing`, is empty), or ``sweep_after`` seconds passed (its rows then sweep: poll
        fal as without webhooks)."""
        return not missing or self.age(now) >= sweep_after


def _flow_run_id(value: str | UUID) -> str:
    """``value`` as a canonical UUID string (ValueError if it is none): keys stay plain."""
    return str(UUID(str(value)))


def waiter_key(flow_run_id: str | UUID) -> str:
    """The record key of the waiter of ``flow_run_id``."""
    return "gptimage-waiter-" + _flow_run_id(flow_run_id)


def pointer_key(request_id: str) -> str:
    """The record key naming the flow run that waits for ``request_id``'s callback."""
    return "gptimage-waiting-" + check_request_id(request_id)


def write_waiter(
    flow_run_id: str | UUID, request_ids: list[str], paid: list[str] | None = None
) -> Waiter:
    """Record the waiter of ``flow_run_id`` (``paid``: the request ids the run paid for) and a
    pointer per request id, unless they exist: the waiter recorded (the first one, on a resumed
    run)."""
    from prefect_gptimage.tasks.queue import record_once  # the one recorded-step helper

    run = _flow_run_id(flow_run_id)
    ids = tuple(check_request_id(rid) for rid in request_ids)
    fresh = Waiter(flow_run_id=run, request_ids=ids, paid=tuple(paid or ()))
    waiter, _ = record_once(waiter_key(run), lambda: fresh)
    for rid in waiter.request_ids:
        record_once(pointer_key(rid), lambda: run)
    return waiter


def read_waiter(flow_run_id: str | UUID) -> Waiter | None:
    """The waiter recorded for ``flow_run_id``, or None."""
    value = cached_value(waiter_key(flow_run_id))
    return value if isinstance(value, Waiter) else None


def waiter_of(request_id: str) -> str | None:
    """The flow-run id waiting for ``request_id``'s callback, or None."""
    value = cached_value(pointer_key(request_id))
    return value if isinstance(value, str) else None
