"""The fleet's spend budget: a Prefect global concurrency limit every run and worker draws from.

The limit ``fal-gpt-image-budget`` (``PREFECT_GPTIMAGE_BUDGET_LIMIT_NAME`` renames it) is the
budget: **one slot is $0.001**, the limit is what may be spent, and the slot decay per second is
the refill rate. A daily budget of $50::

    prefect gcl create fal-gpt-image-budget --limit 50000 --slot-decay-per-second 0.5787

Operators see it on the UI's Concurrency page and change it with ``prefect gcl update``, with no
redeploy. No such limit (or an inactive one): no fleet budget.

Right before each **billable** submit (never for a cached row, nor one resumed at fal: the submit
intent calls :func:`take_budget` only when it really sends), the request takes its estimated
price (:func:`~prefect_gptimage.pricing.estimate_cost`, the one price source) in slots, rounded
up, and never gives them back: only decay refills them. Taking is one atomic increment on the
Prefect server (the public client's ``increment_concurrency_slots``; the server adds the slots
only if they fit), so two runs on two machines never spend more than the budget together.
Prefect's ``rate_limit`` does the same but refuses a limit without slot decay, which a fixed
budget is; the increment accepts both.

When the budget cannot cover a request it is not submitted: :class:`BudgetExhausted` says, in
one line, the budget's name, what is left and when it refills. With ``wait`` seconds, the
request first waits that long for decay (or an operator) to make room, asking again every few
seconds (tenacity).

Transient Prefect API failures (a server restarting) are retried under the package's one
:class:`~prefect_gptimage.retry.RetryPolicy`.

Example:
    >>> slots_for(0.009), slots_for(0.0185), slots_for(0.0)
    (9, 19, 0)
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, NamedTuple

import httpx
import tenacity
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from prefect_gptimage.errors import BudgetExhausted, PrefectApiUnavailable
from prefect_gptimage.retry import RetryPolicy, is_transient_prefect_api_error
from prefect_gptimage.settings import get_settings

__all__ = ["SLOT_USD", "BudgetState", "read_budget", "slots_for", "take_budget"]

logger = logging.getLogger("prefect_gptimage.budget")

#: USD one slot of the budget limit stands for.
SLOT_USD = 0.001
#: Longest pause (seconds) between two asks while waiting for the budget to refill.
WAIT_STEP = 5.0


def slots_for(cost: float) -> int:
    """Slots that cover ``cost`` USD (rounded up: the budget is never under-charged)."""
    return max(0, math.ceil(round(cost / SLOT_USD, 6)))


class BudgetState(NamedTuple):
    """The budget limit as the Prefect API reports it."""

    name: str
    limit: int
    active_slots: int
    decay_per_second: float

    @property
    def left_usd(self) -> float:
        """What is left to spend (USD), as of the last slot taken (decay not counted since)."""
        return max(0, self.limit - self.active_slots) * SLOT_USD

    def refill(self, slots: int) -> str:
        """When ``slots`` fit again, in words."""
        if self.decay_per_second <= 0:
            return (
                "it does not refill (no slot decay): raise it with "
                f"`prefect gcl update {self.name} --limit N`"
            )
        missing = max(0, slots - (self.limit - self.active_slots))
        rate = self.decay_per_second * SLOT_USD * 3600
        seconds = missing / self.decay_per_second
        return f"it refills ${rate:.3f}/hour, enough for this in about {seconds:.0f} s"

    def describe(self, cost: float) -> str:
        """The one line of a request the budget cannot cover."""
        slots = slots_for(cost)
        return (
            f"fleet budget {self.name!r} cannot cover ${cost:.3f}: ${self.left_usd:.3f} left "
            f"of ${self.limit * SLOT_USD:.3f}; {self.refill(slots)}. Not submitted, nothing paid: "
            "a later run submits it"
        )


def _api(call: Any) -> Any:
    """One Prefect API call, transient failures retried under the one retry policy."""
    retrying = RetryPolicy.from_settings().retrying(retry_on=is_transient_prefect_api_error)
    return retrying(call)


#: How long "there is no budget limit" is trusted (seconds): a lookup per submit otherwise.
ABSENT_TTL = 10.0
_absent: dict[str, float] = {}  # limit name -> when it was found missing (a cache, not state)


def read_budget(name: str | None = None) -> BudgetState | None:
    """The fleet budget limit ``name`` (default: the setting), None when there is none (or it
    is inactive; that answer is trusted for :data:`ABSENT_TTL` seconds). A Prefect API that is
    briefly away is asked again under the retry policy; no API at all means no fleet budget."""
    name = name or get_settings().budget_limit_name
    seen = _absent.get(name)
    if seen is not None and time.monotonic() - seen < ABSENT_TTL:
        return None

    def read() -> BudgetState | None:
        try:
            with get_client(sync_client=True) as client:
                limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return None
        if not limit.active:
            return None
        return BudgetState(name, limit.limit, limit.active_slots, limit.slot_decay_per_second)

    try:
        state: BudgetState | None = _api(read)
    except Exception as exc:
        if is_transient_prefect_api_error(exc):
            raise
        logger.debug("fleet budget %r not read (%s): no fleet budget", name, exc)
        state = None
    if state is None:
        _absent[name] = time.monotonic()
    else:
        _absent.pop(name, None)
    return state


class _NotCovered(Exception):
    """The server refused the slots (423): they do not fit now."""


def _increment(name: str, slots: int) -> None:
    """Take ``slots`` at once or raise :class:`_NotCovered` (the server's 423)."""

    def call() -> None:
        try:
            with get_client(sync_client=True) as client:
                client.increment_concurrency_slots(names=[name], slots=slots, mode="concurrency")
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 423:
                raise _NotCovered() from exc
            raise

    _api(call)


def take_budget(cost: float, *, wait: float = 0.0, name: str | None = None) -> int:
    """Take ``cost`` (USD) from the fleet budget before a billable submit; the slots taken (0:
    no fleet budget, or a free request). Raises :class:`BudgetExhausted` when the budget cannot
    cover it within ``wait`` seconds, :class:`PrefectApiUnavailable` when the Prefect API failed
    beyond the retry policy: nothing was taken then, and nothing may be sent to fal."""
    try:
        return _take(cost, wait, name)
    except (BudgetExhausted, PrefectApiUnavailable):
        raise
    except Exception as exc:  # the Prefect API failed for good: nothing was sent to fal
        raise PrefectApiUnavailable(
            f"fleet budget: could not take ${cost:.3f} from the Prefect API "
            f"({type(exc).__name__}: {exc}); nothing was submitted"
        ) from exc


def _take(cost: float, wait: float, name: str | None) -> int:
    state = read_budget(name)
    slots = slots_for(cost)
    if state is None or slots == 0:
        return 0
    if slots > state.limit:  # can never fit: Prefect would answer 422
        raise BudgetExhausted(state.describe(cost))
    try:
        if wait > 0:
            tenacity.Retrying(
                retry=tenacity.retry_if_exception_type(_NotCovered),
                stop=tenacity.stop_after_delay(wait),
                wait=tenacity.wait_fixed(min(WAIT_STEP, wait)),
                reraise=True,
            )(_increment, state.name, slots)
        else:
            _increment(state.name, slots)
    except _NotCovered:
        now = read_budget(state.name) or state
        raise BudgetExhausted(now.describe(cost)) from None
    logger.debug("fleet budget %r: took %d slot(s) for $%.3f", state.name, slots, cost)
    return slots
