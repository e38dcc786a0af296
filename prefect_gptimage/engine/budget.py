"""``max_cost``: refuse a run whose plan costs more, and keep later spending within it; and
what the fleet budget held back.

The fleet budget itself (a Prefect global concurrency limit every run draws from, taken right
before each billable submit) is :mod:`prefect_gptimage.tasks.fleet_budget`; here the run lists
the rows it held back (:func:`held_back_message`). Both apply: ``max_cost`` per run, the fleet
budget across runs.

Checked once before anything is paid (:func:`refuse_over_budget`: the plan's estimate against
``max_cost``; cached rows are free), then, for the spending a plan cannot know in advance (the
OCR gate's regenerations), by a :class:`Budget` each row asks before it submits more.

Example:
    >>> budget = Budget(limit=0.02, spent=0.009)
    >>> budget.allow(0.009), budget.allow(0.009)
    (True, False)
"""

from __future__ import annotations

import threading

from prefect.client.schemas.objects import State
from prefect.states import Failed

from prefect_gptimage.engine.plan import Plan
from prefect_gptimage.reporting.summary import RunSummary

__all__ = ["HELD_BACK", "OVER_BUDGET", "Budget", "held_back_message", "refuse_over_budget"]

#: ``error_type`` of a row that stopped because paying more would exceed ``max_cost``.
OVER_BUDGET = "over_budget"
#: ``error_type`` of a row the fleet budget held back (not submitted, nothing paid).
HELD_BACK = "BudgetExhausted"


class Budget:
    """What a run may still spend (thread-safe); ``limit`` None: no limit."""

    def __init__(self, limit: float | None, spent: float = 0.0) -> None:
        self.limit = limit
        self.spent = spent
        self._lock = threading.Lock()

    def allow(self, cost: float) -> bool:
        """Count ``cost`` as spent if it fits within the limit; False (nothing counted) if not."""
        with self._lock:
            if self.limit is not None and self.spent + cost > self.limit + 1e-9:
                return False
            self.spent = round(self.spent + cost, 6)
            return True

    def __repr__(self) -> str:
        return f"Budget(limit={self.limit}, spent={self.spent})"


def refuse_over_budget(
    run_key: str, plan: Plan, requests: int, max_cost: float | None, summary: RunSummary
) -> State[RunSummary] | None:
    """The Failed state of a run whose plan costs more than ``max_cost`` (after announcing it
    with a ``spend_refused`` event), or None when it fits."""
    if max_cost is None or plan.cost <= max_cost:
        return None
    from prefect_gptimage.reporting.events import spend_refused

    spend_refused(
        run_key, estimate=plan.cost, max_cost=max_cost, requests=requests, cached=plan.cached
    )
    return Failed(
        data=summary,
        message=f"estimated cost ${plan.cost:.3f} exceeds max_cost ${max_cost:.3f}: "
        "nothing submitted",
    )


def held_back_message(summary: RunSummary) -> str | None:
    """The run's final message when the fleet budget held rows back: how many, which lines, and
    that a later run submits only those; None when it held none back."""
    held = [f for f in summary.failures if f.error_type == HELD_BACK]
    if not held:
        return None
    lines = ", ".join(str(f.line) for f in held[:20] if f.line is not None)
    more = ", ..." if len(held) > 20 else ""
    others = len(summary.failures) - len(held)
    return (
        f"the fleet budget held back {len(held)} row(s) (line {lines}{more}), unpaid: a later "
        "run submits only those" + (f"; {others} other row(s) failed" if others else "")
    )
