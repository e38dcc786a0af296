"""Waiter records: a suspended flow run, and the fal requests whose callbacks it waits for.

A deployment run of the batch flow that suspends while fal works
(:mod:`prefect_gptimage.engine.suspend`) submits its rows in **waves** and suspends once per
wave, with the pause key :func:`suspend_key` of that wave. Before each suspend it writes, in the
shared result storage the cache and the callback records use:

* one **waiter** record under :func:`waiter_key` (its flow-run id and the wave's number): the
  request ids of the wave, those the run paid for, and when it started waiting;
* one **pointer** record per request id under :func:`pointer_key`: the flow-run id that waits
  for that request's callback.

The webhook receiver (:mod:`prefect_gptimage.webhooks.resume`) reads which wave a Suspended run
waits on from its state's pause key (:func:`wave_of_key`), and resumes it once that wave's
waiter is :meth:`Waiter.ready` (every callback recorded, or the sweep delay passed). Every
record is written once (:func:`record_once`): a resumed run that writes a wave's waiter again
gets the first one back, with its ids and start time. A request id already pointing at another
run keeps that pointer (the receiver's periodic pass still finds the second run: see the
receiver).
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
    "SUSPEND_KEY_PREFIX",
    "Waiter",
    "pointer_key",
    "read_waiter",
    "suspend_key",
    "waiter_key",
    "waiter_of",
    "wave_of_key",
    "write_waiter",
]

#: The pause keys of a run's suspends: this prefix and the wave's number (one suspend per wave,
#: so a resumed run that reaches a wave's suspend again goes on: Prefect refuses a used key).
SUSPEND_KEY_PREFIX = "gptimage-wave-"


class Waiter(BaseModel):
    """A flow run waiting (suspended) for the callbacks of ``request_ids``."""

    model_config = ConfigDict(frozen=True)

    flow_run_id: str = Field(description="The suspended flow run (a UUID).")
    wave: int = Field(default=0, ge=0, description="The wave's number in its run, from 0.")
    request_ids: tuple[str, ...] = Field(description="fal request ids of the wave it submitted.")
    paid: tuple[str, ...] = Field(
        default=(), description="Those of them the run paid for (not found recorded)."
    )
    paid_cost: float = Field(
        default=0.0, ge=0, description="The estimated cost of ``paid``, in USD."
    )
    next_row: int = Field(
        default=0,
        ge=0,
        description="Rows of the batch this wave and the earlier ones went through: a resumed "
        "run starts the next wave there, without reading the earlier rows' records again.",
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


def suspend_key(wave: int) -> str:
    """The pause key of the suspend for ``wave``.

    >>> suspend_key(0), wave_of_key(suspend_key(7)), wave_of_key("another-flows-pause")
    ('gptimage-wave-0', 7, None)
    """
    return f"{SUSPEND_KEY_PREFIX}{wave}"


def wave_of_key(pause_key: str | None) -> int | None:
    """The wave a suspend with ``pause_key`` waits on; None if it is no key of ours."""
    if pause_key is None or not pause_key.startswith(SUSPEND_KEY_PREFIX):
        return None
    number = pause_key[len(SUSPEND_KEY_PREFIX) :]
    return int(number) if number.isdigit() else None


def waiter_key(flow_run_id: str | UUID, wave: int = 0) -> str:
    """The record key of the waiter of ``flow_run_id``'s ``wave``."""
    return f"gptimage-waiter-{_flow_run_id(flow_run_id)}-{wave}"


def pointer_key(request_id: str) -> str:
    """The record key naming the flow run that waits for ``request_id``'s callback."""
    return "gptimage-waiting-" + check_request_id(request_id)


def write_waiter(waiter: Waiter) -> tuple[Waiter, bool]:
    """Record ``waiter`` and a pointer per request id, unless they exist: the waiter recorded
    (the first one, on a resumed run), and whether it was recorded already."""
    from prefect_gptimage.tasks.queue import record_once  # the one recorded-step helper

    run = _flow_run_id(waiter.flow_run_id)
    fresh = waiter.model_copy(
        update={
            "flow_run_id": run,
            "request_ids": tuple(check_request_id(rid) for rid in waiter.request_ids),
        }
    )
    recorded, found = record_once(waiter_key(run, waiter.wave), lambda: fresh)
    for rid in recorded.request_ids:
        record_once(pointer_key(rid), lambda: run)
    return recorded, found


def read_waiter(flow_run_id: str | UUID, wave: int = 0) -> Waiter | None:
    """The waiter recorded for ``flow_run_id``'s ``wave``, or None."""
    value = cached_value(waiter_key(flow_run_id, wave))
    return value if isinstance(value, Waiter) else None


def waiter_of(request_id: str) -> str | None:
    """The flow-run id waiting for ``request_id``'s callback, or None."""
    value = cached_value(pointer_key(request_id))
    return value if isinstance(value, str) else None
