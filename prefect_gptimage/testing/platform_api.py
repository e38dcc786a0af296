"""fal's platform API, as the emulator answers it: pricing, estimate and billing events.

Served on the emulator's own host (``PREFECT_GPTIMAGE_FAL_API_URL`` points there, see
``FalEmulator.env``), under ``/v1/models/...``:

* ``GET /v1/models/pricing?endpoint_id=a,b`` (any key) → ``{"prices": [{endpoint_id,
  unit_price, unit: "image", currency: "USD"}], "next_cursor": null, "has_more": false}``;
* ``POST /v1/models/pricing/estimate`` ``{"estimate_type": "unit_price", "endpoints": {id:
  {"unit_quantity": n}}}`` → ``{"estimate_type", "total_cost", "currency"}``;
* ``GET /v1/models/billing-events?request_id=a,b`` (the **admin** key, 1-50 ids; ``limit`` and
  ``cursor`` page) → ``{"billing_events": [...], "next_cursor", "has_more"}``.

It bills what it actually ran: a request that completed with its images; one cancelled (in the
queue or while running) or failed costs nothing and has no event. An event's units are the
request's images priced by the table relative to the base unit (one ``low`` 1024x1024 image),
at the unit price in effect when it completed. A test (or ``POST /_emulator/platform``) can
change a unit price at run time, delay events (they appear ``billing_delay`` seconds after the
request completed) and make the next ``n`` billing-events calls answer 500.

Example:
    >>> state = PlatformState()
    >>> state.set_unit_price("fal-ai/gpt-image-1.5", 0.01)
    >>> state.unit_price("fal-ai/gpt-image-1.5")
    0.01
"""

from __future__ import annotations

import base64
import threading
import time
from typing import TYPE_CHECKING, Any

from prefect_gptimage.pricing import PRICE_PER_IMAGE, builtin_unit_price
from prefect_gptimage.schemas import EDIT_ENDPOINT, TEXT_TO_IMAGE_ENDPOINT
from prefect_gptimage.testing.records import COMPLETED

if TYPE_CHECKING:
    from prefect_gptimage.testing.core import EmulatorCore
    from prefect_gptimage.testing.records import EmulatedRequest

__all__ = ["ADMIN_KEY", "PLATFORM_PREFIX", "PlatformState", "answer_platform"]

#: Where the platform routes live on the emulator's host.
PLATFORM_PREFIX = "/v1/models/"
#: The admin key billing events accept (``FAL_ADMIN_KEY`` in tests).
ADMIN_KEY = "emulator-admin-key"
_MAX_IDS = 50


class PlatformState:
    """The emulator's prices and billing switches (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Built-in prices, no delay, no failures, counters at zero."""
        with self._lock:
            base = builtin_unit_price()
            self._prices = {TEXT_TO_IMAGE_ENDPOINT: base, EDIT_ENDPOINT: base}
            self._delay = 0.0
            self._fail_next = 0
            self._charged: dict[str, tuple[float, float]] = {}  # id -> (unit price, when)
            self.calls: dict[str, int] = {"pricing": 0, "estimate": 0, "billing_events": 0}
            self.failed_calls = 0

    def set_unit_price(self, endpoint: str, price: float) -> None:
        """fal's unit price of ``endpoint`` from now on (requests completing later bill it)."""
        with self._lock:
            self._prices[endpoint] = float(price)

    def unit_price(self, endpoint: str) -> float:
        """The unit price of ``endpoint`` now."""
        with self._lock:
            return self._prices.get(endpoint, builtin_unit_price())

    def set_billing_delay(self, seconds: float) -> None:
        """Billing events appear ``seconds`` after their request completed."""
        with self._lock:
            self._delay = float(seconds)

    def fail_billing(self, times: int) -> None:
        """The next ``times`` billing-events calls answer 500."""
        with self._lock:
            self._fail_next = int(times)

    def to_dict(self) -> dict[str, Any]:
        """Prices, switches and counters, for the admin API."""
        with self._lock:
            return {
                "unit_prices": dict(self._prices),
                "billing_delay": self._delay,
                "billing_500": self._fail_next,
                "calls": dict(self.calls),
                "failed_calls": self.failed_calls,
            }

    def configure(self, data: dict[str, Any]) -> None:
        """``{"unit_prices": {id: usd}, "billing_delay": s, "billing_500": n}`` (each optional)."""
        for endpoint, price in (data.get("unit_prices") or {}).items():
            self.set_unit_price(str(endpoint), float(price))
        if data.get("billing_delay") is not None:
            self.set_billing_delay(float(data["billing_delay"]))
        if data.get("billing_500") is not None:
            self.fail_billing(int(data["billing_500"]))

    # -- billing -----------------------------------------------------------------------------

    def count(self, what: str) -> None:
        """Count one call of route ``what`` (``pricing``, ``estimate``, ``billing_events``)."""
        with self._lock:
            self.calls[what] += 1

    def take_failure(self) -> bool:
        """Whether this billing-events call answers 500 (one of the ``fail_billing`` ones)."""
        with self._lock:
            if self._fail_next > 0:
                self._fail_next -= 1
                self.failed_calls += 1
                return True
            return False

    def event(self, req: EmulatedRequest, wall_completed: float) -> dict[str, Any] | None:
        """The billing event of ``req`` (a completed request), None when it cost nothing.

        The unit price is fixed the first time the request is billed (its completion).
        """
        if req.status != COMPLETED or req.outcome is not None:
            return None  # failed or cancelled: nothing billed
        with self._lock:
            if req.request_id not in self._charged:
                price = self._prices.get(req.endpoint, builtin_unit_price())
                self._charged[req.request_id] = (price, wall_completed)
            price, _ = self._charged[req.request_id]
        units = units_of(req)
        return {
            "request_id": req.request_id,
            "endpoint_id": req.endpoint,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall_completed)),
            "output_units": units,
            "unit_price": price,
            "percent_discount": None,
            "cost_estimate_nano_usd": round(units * price * 1e9),
        }

    def bill(self, core: EmulatorCore) -> dict[str, float]:
        """What the emulator charged (USD) per request id, events delayed or not: the truth a
        reconciled manifest must equal."""
        out: dict[str, float] = {}
        for req, wall in _completed(core):
            event = self.event(req, wall)
            if event is not None:
                out[req.request_id] = event["cost_estimate_nano_usd"] / 1e9
        return out


def units_of(req: EmulatedRequest) -> float:
    """Billed units of a request: its images, each priced relative to fal's base unit."""
    args = req.arguments
    table = PRICE_PER_IMAGE[str(args.get("quality", "high"))]
    size = str(args.get("image_size", "1024x1024"))
    each = table[size] if size in table else max(table.values())
    return round(req.num_images * each / builtin_unit_price(), 6)


def _completed(core: EmulatorCore) -> list[tuple[EmulatedRequest, float]]:
    model = core.model
    with model.cond:
        model.advance_locked(time.monotonic())
        return [
            (r, model.wall(r.completed_at) or time.time())
            for r in model.requests.values()
            if r.status == COMPLETED and r.completed_at is not None
        ]


def _ids(query: dict[str, list[str]], name: str) -> list[str]:
    return [i.strip() for v in query.get(name, []) for i in v.split(",") if i.strip()]


def answer_platform(
    core: EmulatorCore,
    method: str,
    path: str,
    query: dict[str, list[str]],
    body: Any,
    authorization: str,
) -> tuple[int, Any]:
    """Answer one platform call: ``(status code, JSON body)``."""
    state = core.platform
    route = path.removeprefix(PLATFORM_PREFIX).strip("/")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme != "Key" or not token.strip():
        return 401, {"detail": "Authorization: Key <api key> is required"}
    if route == "pricing" and method == "GET":
        state.count("pricing")
        ids = _ids(query, "endpoint_id")
        if not 1 <= len(ids) <= _MAX_IDS:
            return 422, {"detail": "endpoint_id: 1 to 50 endpoint ids"}
        prices = [
            {
                "endpoint_id": e,
                "unit_price": state.unit_price(e),
                "unit": "image",
                "currency": "USD",
            }
            for e in ids
            if e in (TEXT_TO_IMAGE_ENDPOINT, EDIT_ENDPOINT)
        ]
        return 200, {"prices": prices, "next_cursor": None, "has_more": False}
    if route == "pricing/estimate" and method == "POST":
        state.count("estimate")
        endpoints = (body or {}).get("endpoints") if isinstance(body, dict) else None
        if not isinstance(endpoints, dict) or not endpoints:
            return 422, {"detail": "endpoints: a map of endpoint id to quantities"}
        total = sum(
            state.unit_price(e) * float((q or {}).get("unit_quantity", 1))
            for e, q in endpoints.items()
        )
        estimate_type = str(body.get("estimate_type", "unit_price"))
        return 200, {
            "estimate_type": estimate_type,
            "total_cost": round(total, 6),
            "currency": "USD",
        }
    if route == "billing-events" and method == "GET":
        state.count("billing_events")
        if token.strip() != ADMIN_KEY:
            return 403, {"detail": "Admin API key required"}
        if not 1 <= len(set(_ids(query, "request_id"))) <= _MAX_IDS:
            return 422, {"detail": "request_id: 1 to 50 request ids"}
        if state.take_failure():
            return 500, {"detail": "Internal server error"}
        return 200, _billing_page(core, state, query)
    return 404, {"detail": "Not Found"}


def _billing_page(
    core: EmulatorCore, state: PlatformState, query: dict[str, list[str]]
) -> dict[str, Any]:
    ids = set(_ids(query, "request_id"))
    delay = state.to_dict()["billing_delay"]
    now = time.time()
    events = [
        event
        for req, wall in _completed(core)
        if req.request_id in ids and wall + delay <= now
        for event in [state.event(req, wall)]
        if event is not None
    ]
    limit = int((query.get("limit") or ["100"])[-1])
    cursor = (query.get("cursor") or [""])[-1]
    start = int(base64.b64decode(cursor).decode()) if cursor else 0
    page = events[start : start + limit]
    more = start + limit < len(events)
    next_cursor = base64.b64encode(str(start + limit).encode()).decode() if more else None
    return {"billing_events": page, "next_cursor": next_cursor, "has_more": more}
