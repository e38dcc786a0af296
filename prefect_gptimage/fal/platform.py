"""fal's platform API (``https://api.fal.ai/v1``): the price of an endpoint, and what fal billed.

The queue API (:mod:`prefect_gptimage.fal.client`) makes images; this client reads what they
cost, from the three platform routes the package uses:

* ``GET /v1/models/pricing?endpoint_id=a,b`` → ``{"prices": [{endpoint_id, unit_price, unit,
  currency}], "next_cursor", "has_more"}`` (any API key): :meth:`FalPlatformClient.prices`;
* ``POST /v1/models/pricing/estimate`` → ``{"estimate_type", "total_cost", "currency"}``:
  :meth:`FalPlatformClient.estimate`;
* ``GET /v1/models/billing-events?request_id=a,b&start=...`` → ``{"billing_events":
  [{request_id, endpoint_id, timestamp, output_units, unit_price, percent_discount,
  cost_estimate_nano_usd}], "next_cursor", "has_more"}``: 1-50 request ids a call, an **admin**
  key, a 90-day window (``start`` defaults to 24 hours ago, so it is always sent):
  :meth:`FalPlatformClient.billing_events`.

Transient failures (connection errors, 429, 5xx: fal's billing events are known to answer 500
now and then) are retried under the package's one
:class:`~prefect_gptimage.retry.RetryPolicy`; other answers raise
:class:`~prefect_gptimage.errors.PermanentFalError` at once. No Prefect import: this is the fal
layer.

Example:
    >>> client = FalPlatformClient("https://api.fal.ai", key="id:secret")  # doctest: +SKIP
    >>> client.prices(["fal-ai/gpt-image-1.5"])["fal-ai/gpt-image-1.5"].unit_price  # doctest: +SKIP
    0.009
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from prefect_gptimage.errors import PermanentFalError, TransientFalError
from prefect_gptimage.retry import RetryPolicy, is_transient_status

__all__ = [
    "BILLING_BATCH",
    "DEFAULT_API_URL",
    "BillingEvent",
    "FalPlatformClient",
    "UnitPrice",
]

#: fal's platform API.
DEFAULT_API_URL = "https://api.fal.ai"
#: Request ids per billing-events call: fal takes 1 to 50.
BILLING_BATCH = 50


class UnitPrice(BaseModel):
    """One endpoint's price from fal's pricing route."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    endpoint_id: str
    unit_price: float = Field(description="USD per unit (for GPT Image 1.5: per image).")
    unit: str = "image"
    currency: str = "USD"


class BillingEvent(BaseModel):
    """One billing event: what fal charged for a request."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    request_id: str
    endpoint_id: str | None = None
    timestamp: str | None = None
    output_units: float = 0.0
    unit_price: float = 0.0
    percent_discount: float | None = None
    cost_estimate_nano_usd: int = Field(default=0, description="What fal charged, in 1e-9 USD.")

    @property
    def cost_usd(self) -> float:
        """What fal charged for this event, in USD."""
        return self.cost_estimate_nano_usd / 1e9


def batches(ids: Sequence[str], size: int = BILLING_BATCH) -> Iterator[list[str]]:
    """``ids`` in groups of at most ``size``, in order.

    Example:
        >>> [len(b) for b in batches([str(i) for i in range(120)])]
        [50, 50, 20]
    """
    for i in range(0, len(ids), size):
        yield list(ids[i : i + size])


class FalPlatformClient:
    """A small client of fal's platform API (see the module docs). ``key`` is a normal API key
    (pricing, estimate); ``admin_key`` an admin key (billing events)."""

    def __init__(
        self,
        api_url: str = DEFAULT_API_URL,
        *,
        key: str | None = None,
        admin_key: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._key, self._admin_key = key, admin_key
        self.retry = retry or RetryPolicy()
        self.timeout = timeout

    def _call(self, method: str, path: str, key: str | None, **kwargs: Any) -> Any:
        """One call (retried under :attr:`retry`), its JSON answer."""
        headers = {"Authorization": f"Key {key}"} if key else {}

        def attempt() -> Any:
            try:
                with httpx.Client(timeout=self.timeout) as http:
                    response = http.request(
                        method, f"{self.api_url}/v1{path}", headers=headers, **kwargs
                    )
            except httpx.TransportError as exc:
                raise TransientFalError(
                    f"fal platform API {path}: {type(exc).__name__}: {exc}"
                ) from exc
            if response.is_success:
                return response.json()
            detail = response.text[:300]
            message = f"fal platform API {path} answered {response.status_code}: {detail}"
            if is_transient_status(response.status_code, response.headers):
                raise TransientFalError(message, status_code=response.status_code)
            raise PermanentFalError(message, status_code=response.status_code)

        return self.retry.retrying()(attempt)

    def prices(self, endpoint_ids: Sequence[str]) -> dict[str, UnitPrice]:
        """fal's unit price of each of ``endpoint_ids`` (1 to 50), by endpoint id."""
        body = self._call(
            "GET", "/models/pricing", self._key, params={"endpoint_id": ",".join(endpoint_ids)}
        )
        found = [UnitPrice.model_validate(p) for p in (body or {}).get("prices", [])]
        return {p.endpoint_id: p for p in found}

    def estimate(self, quantities: dict[str, float]) -> float:
        """fal's estimate (USD) of ``quantities`` units per endpoint id."""
        payload = {
            "estimate_type": "unit_price",
            "endpoints": {e: {"unit_quantity": q} for e, q in quantities.items()},
        }
        body = self._call("POST", "/models/pricing/estimate", self._key, json=payload)
        return float(body["total_cost"])

    def billing_events(
        self, request_ids: Sequence[str], *, start: datetime | None = None
    ) -> list[BillingEvent]:
        """The billing events of ``request_ids`` (any number: asked 50 at a time, every page
        read). ``start``: the earliest submit (fal's default window is the last 24 hours)."""
        if not self._admin_key:
            raise PermanentFalError("billing events need an admin key (FAL_ADMIN_KEY)")
        events: list[BillingEvent] = []
        for group in batches(request_ids):
            params: dict[str, Any] = {"request_id": ",".join(group), "limit": 100}
            if start is not None:
                params["start"] = start.isoformat()
            while True:
                body = self._call("GET", "/models/billing-events", self._admin_key, params=params)
                events += [BillingEvent.model_validate(e) for e in body.get("billing_events", [])]
                cursor = body.get("next_cursor")
                if not body.get("has_more") or not cursor:
                    break
                params["cursor"] = cursor
        return events
