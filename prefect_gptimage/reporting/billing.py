"""The bill reconciled: what fal charged per request, beside the estimate, in the manifest.

With an admin key (``FAL_ADMIN_KEY``, or the ``admin_key`` of a ``FalCredentials`` block), a
run asks fal's billing events (:meth:`~prefect_gptimage.fal.platform.FalPlatformClient.
billing_events`: 50 request ids a call, retried under the one retry policy) for every request
id of its manifest once its rows ended, and waits a bounded time
(``PREFECT_GPTIMAGE_BILLING_WAIT``) for events that arrive late: fal records them with a delay.
Only requests that made images are waited for; a failed one may rightly have no event (fal
bills successful outputs only).

Each image line then carries ``billed_cost_usd`` (its request's bill shared among its images),
each failure line with a request id what fal billed for it (usually 0), and the totals a billed
sum. A row whose bill differs from its estimate by more than :data:`TOLERANCE_USD` is reported
(:attr:`Reconciliation.differences`). Without an admin key nothing changes, and the reports say
costs are estimates.

:func:`reconcile_manifest_file` is the same for a manifest written earlier, local or on S3
(``prefect-gptimage reconcile MANIFEST_URI``): the reconciled manifest is written beside it.

Example:
    >>> Reconciliation(lines=[], billed={}, waiting=[], differences=[]).complete
    True
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.fal.platform import FalPlatformClient
from prefect_gptimage.reporting.manifest import FailureLine, ImageLine, Manifest
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.retry import RetryPolicy
from prefect_gptimage.settings import get_settings

__all__ = [
    "TOLERANCE_USD",
    "Difference",
    "Reconciliation",
    "admin_key",
    "cost_words",
    "fetch_bill",
    "reconcile_lines",
]

logger = logging.getLogger("prefect_gptimage.billing")

#: A row's bill may differ from its estimate by this much (USD) before it is reported.
TOLERANCE_USD = 0.0005
#: Seconds between two asks for billing events that have not arrived yet.
POLL_EVERY = 2.0
#: fal's billing events cover 90 days; asked from a little less.
WINDOW = timedelta(days=89)

Line = ImageLine | FailureLine


def admin_key(block_key: str | None = None) -> str | None:
    """The admin key: ``block_key`` (a block's), else the environment's (see
    :meth:`~prefect_gptimage.credentials.FalCredentials.get_admin_key`), else None."""
    return block_key or FalCredentials().get_admin_key()


class Difference(NamedTuple):
    """A request whose bill differs from its estimate beyond :data:`TOLERANCE_USD`."""

    request_id: str
    estimated_usd: float
    billed_usd: float

    def __str__(self) -> str:
        return (
            f"{self.request_id}: estimated ${self.estimated_usd:.4f}, "
            f"fal billed ${self.billed_usd:.4f}"
        )


class Reconciliation(NamedTuple):
    """A manifest's lines with their bills, and what did not reconcile."""

    lines: list[Line]
    billed: dict[str, float]  # request id -> USD fal billed
    waiting: list[str]  # requests that made images but have no billing event yet
    differences: list[Difference]

    @property
    def complete(self) -> bool:
        """Every request that made images has its billing event."""
        return not self.waiting

    @property
    def billed_total(self) -> float:
        """What fal billed for the manifest's requests, in USD."""
        return round(sum(self.billed.values()), 6)


def fetch_bill(
    request_ids: list[str],
    expected: set[str],
    key: str,
    *,
    wait: float | None = None,
    client: FalPlatformClient | None = None,
) -> tuple[dict[str, float], list[str]]:
    """What fal billed per request id (USD), asking again for ``expected`` ids still without an
    event for up to ``wait`` seconds (None: ``PREFECT_GPTIMAGE_BILLING_WAIT``); also the
    expected ids that never got one."""
    settings = get_settings()
    wait = settings.billing_wait if wait is None else wait
    client = client or FalPlatformClient(
        settings.fal_api_url, admin_key=key, retry=RetryPolicy.from_settings()
    )
    start = datetime.now(timezone.utc) - WINDOW
    billed: dict[str, float] = {}
    ask = list(dict.fromkeys(request_ids))
    deadline = time.monotonic() + wait
    while ask:
        for event in client.billing_events(ask, start=start):
            billed[event.request_id] = billed.get(event.request_id, 0.0) + event.cost_usd
        ask = [r for r in expected if r not in billed]
        if not ask or time.monotonic() + POLL_EVERY > deadline:
            break
        logger.info("waiting for fal's billing events of %d request(s)", len(ask))
        time.sleep(POLL_EVERY)
    return {r: round(c, 9) for r, c in billed.items()}, sorted(
        r for r in expected if r not in billed
    )


def reconcile_lines(
    lines: Sequence[Line], key: str, *, wait: float | None = None
) -> Reconciliation:
    """``lines`` with ``billed_cost_usd`` filled in from fal's billing events (see the module
    docs)."""
    ids = [ln.request_id for ln in lines if ln.request_id]
    made_images = {ln.request_id for ln in lines if isinstance(ln, ImageLine)}
    billed, waiting = fetch_bill(ids, made_images, key, wait=wait) if ids else ({}, [])
    images = Counter(ln.request_id for ln in lines if isinstance(ln, ImageLine))
    estimated: dict[str, float] = {}
    out: list[Line] = []
    for ln in lines:
        if isinstance(ln, ImageLine):
            rid = ln.request_id
            estimated[rid] = estimated.get(rid, 0.0) + (ln.estimated_cost_usd or 0.0)
            share = billed[rid] / images[rid] if rid in billed else None
            out.append(ln.model_copy(update={"billed_cost_usd": _usd(share)}))
        elif ln.request_id:
            cost = billed.get(ln.request_id, 0.0)
            out.append(ln.model_copy(update={"billed_cost_usd": _usd(cost)}))
        else:
            out.append(ln)
    differences = [
        Difference(rid, round(est, 6), round(billed[rid], 6))
        for rid, est in estimated.items()
        if rid in billed and abs(billed[rid] - est) > TOLERANCE_USD
    ]
    differences += [
        Difference(rid, 0.0, round(cost, 6))
        for rid, cost in billed.items()
        if rid not in estimated and cost > TOLERANCE_USD
    ]
    return Reconciliation(out, billed, waiting, differences)


def _usd(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def reconcile_manifest(
    manifest: Manifest, key: str, *, wait: float | None = None
) -> Reconciliation:
    """:func:`reconcile_lines` over a :class:`Manifest`."""
    return reconcile_lines(manifest.lines, key, wait=wait)


def summary_line(rec: Reconciliation, estimated_total: float) -> str:
    """One line for the run's output: estimate, bill, and what did not reconcile."""
    text = f"estimated ${estimated_total:.3f}, fal billed ${rec.billed_total:.3f}"
    if rec.waiting:
        text += f"; {len(rec.waiting)} request(s) not billed yet"
    if rec.differences:
        text += f"; {len(rec.differences)} request(s) differ from the estimate"
    return text


def cost_words(summary: RunSummary) -> str:
    """What a run paid, in words: fal's bill beside the estimate, or the estimate saying so.

    Example:
        >>> cost_words(RunSummary(estimated_cost_usd=0.018))
        '$0.018 (estimated; set FAL_ADMIN_KEY to read what fal billed)'
    """
    estimated = summary.estimated_cost_usd
    if summary.billed_cost_usd is None:
        return f"${estimated:.3f} (estimated; set FAL_ADMIN_KEY to read what fal billed)"
    text = (
        f"fal billed ${summary.billed_cost_usd:.3f} (estimated ${summary.estimated_cost_usd:.3f})"
    )
    if summary.not_billed_yet:
        text += f", {len(summary.not_billed_yet)} request(s) not billed yet"
    return text
