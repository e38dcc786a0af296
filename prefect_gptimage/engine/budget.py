"""``max_cost``: refuse a run whose plan costs more, and keep later spending within it.

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

__all__ = ["OVER_BUDGET", "Budget", "refuse_over_budget"]

#: ``error_type`` of a row that stopped because paying more would exceed ``max_cost``.
OVER_BUDGET = "over_budget"


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
