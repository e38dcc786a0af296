"""THE answer to "what will each row cost": cached, resumed at fal, outcome unknown, or paid.

Per row it asks :func:`~prefect_gptimage.tasks.intents.submit_fate` (the one rule, which the
generate path also asks before taking a fal slot), then totals: the estimated cost of the rows
that will be paid, the rows that cost nothing (cached, or not sent because an earlier submit's
outcome is unknown), and the rows resumed at fal. The batch, the OCR gate and the dry run plan
with it; ``max_cost`` is checked against :attr:`Plan.cost`.

Example:
    >>> Plan(cost=0.018, cached=1, at_fal=0).cost
    0.018
"""

from __future__ import annotations

from typing import NamedTuple

from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.prompts import PromptRow
from prefect_gptimage.tasks.intents import NEEDS_SLOT, Fate, FateStores, fate_stores, submit_fate

__all__ = ["Fate", "Plan", "RowPlan", "plan_cost", "plan_row", "plan_rows"]


class RowPlan(NamedTuple):
    """One row's fate and what it will cost this run (estimated USD)."""

    row: PromptRow
    fate: Fate
    cost: float


class Plan(NamedTuple):
    """What a run's rows will cost, read from the cache and the submit intents."""

    cost: float  # estimated USD of the rows that will be submitted (or resumed at fal)
    cached: int  # rows that cost nothing: cached, or left unsent ("outcome unknown")
    at_fal: int  # rows whose submit is recorded but not cached: resumed, nothing paid again


def plan_row(
    row: PromptRow,
    *,
    resubmit_unknown: bool = False,
    refresh: bool = False,
    stores: FateStores | None = None,
) -> RowPlan:
    """The :class:`RowPlan` of ``row``: its fate, and its estimated cost if it runs at fal.

    A row resumed at fal counts its cost (this run reports it as paid), as a row to be paid does.
    ``stores``: the result stores, resolved once for all rows (:func:`fate_stores`).
    """
    fate = submit_fate(
        row.request, row.variant, resubmit_unknown=resubmit_unknown, refresh=refresh, stores=stores
    )
    return RowPlan(row, fate, estimate_cost(row.request) if fate in NEEDS_SLOT else 0.0)


def plan_rows(
    rows: list[PromptRow], resubmit_unknown: bool = False, *, refresh: bool = False
) -> Plan:
    """The :class:`Plan` of ``rows``. A row whose earlier submit's outcome is unknown is not
    submitted (so free) unless ``resubmit_unknown``; with ``refresh`` every row is paid anew."""
    cost, cached, at_fal = 0.0, 0, 0
    stores = fate_stores() if rows and not refresh else None
    for row in rows:
        planned = plan_row(row, resubmit_unknown=resubmit_unknown, refresh=refresh, stores=stores)
        cost += planned.cost
        cached += planned.fate in ("cached", "unknown")
        at_fal += planned.fate == "at_fal"
    return Plan(round(cost, 6), cached, at_fal)


def plan_cost(rows: list[PromptRow], resubmit_unknown: bool = False) -> tuple[float, int]:
    """Estimated USD of the rows not already cached, and how many rows are cached (free)."""
    plan = plan_rows(rows, resubmit_unknown)
    return plan.cost, plan.cached
