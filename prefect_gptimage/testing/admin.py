"""The emulator's admin API (``/_emulator/...``), for configuring it from another process.

No auth: it is a local test tool. Routes:

========  ===============================  ==================================================
GET       ``/_emulator`` or ``/config``    current config
POST      ``/_emulator/config``            ``latency``, ``concurrency_limit``, ``misspell_rate``
GET       ``/_emulator/stats``             counters (see :class:`EmulatorStats`)
POST      ``/_emulator/reset``             forget requests, counters and faults
GET       ``/_emulator/platform``          prices, billing switches and counters
POST      ``/_emulator/platform``          ``unit_prices``, ``billing_delay``, ``billing_500``
GET       ``/_emulator/faults``            fault rules, with how often each fired
POST      ``/_emulator/faults``            add a rule: a :class:`Fault` as JSON, or a spec
                                           ``{"spec": "status:503_json:3"}``
DELETE    ``/_emulator/faults``            remove every rule
GET       ``/_emulator/requests``          every request's state, in submission order
GET       ``/_emulator/requests/{id}``     one request's state
GET       ``/_emulator/webhooks``          webhook counters (:class:`.webhooks.WebhookStats`)
POST      ``/_emulator/webhooks/faults``   spoil callbacks: ``{"kind": "drop", "count": 2}``
========  ===============================  ==================================================

Example (from a shell, against a standalone emulator)::

    curl --cacert "$SSL_CERT_FILE" -X POST https://$FAL_QUEUE_RUN_HOST/_emulator/faults \\
         -d '{"operation": "submit", "kind": "429", "count": 2}'
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prefect_gptimage.testing.core import check_rate
from prefect_gptimage.testing.faults import Fault
from prefect_gptimage.testing.webhooks import WebhookFault

if TYPE_CHECKING:
    from prefect_gptimage.testing.core import EmulatorCore


def config_of(core: EmulatorCore) -> dict[str, Any]:
    model = core.model
    return {
        "latency": model.latency,
        "concurrency_limit": model.concurrency_limit,
        "misspell_rate": core.misspell_rate,
        "require_key": core.require_key,
        "base_url": core.base_url,
    }


def handle_admin(core: EmulatorCore, method: str, path: str, payload: Any) -> tuple[int, Any]:
    """Answer one admin call: ``(status code, JSON body)``."""
    route = path.rstrip("/").removeprefix("/_emulator").strip("/")
    model = core.model
    try:
        if route in ("", "config") and method == "GET":
            return 200, config_of(core)
        if route == "config" and method == "POST":
            data = payload or {}
            if not isinstance(data, dict) or set(data) - {
                "latency",
                "concurrency_limit",
                "misspell_rate",
            }:
                return 400, {
                    "detail": "expected {'latency': s, 'concurrency_limit': n, 'misspell_rate': r}"
                }
            if data.get("misspell_rate") is not None:
                core.misspell_rate = check_rate(float(data["misspell_rate"]))
            with model.cond:
                model.configure_locked(
                    time.monotonic(), data.get("latency"), data.get("concurrency_limit")
                )
            return 200, config_of(core)
        if route == "platform":  # fal's platform API: prices, billing delay and 500s
            if method == "POST":
                core.platform.configure(payload or {})
            return 200, core.platform.to_dict()
        if route == "stats" and method == "GET":
            return 200, core.stats().to_dict()
        if route == "webhooks" and method == "GET":  # fal's callbacks (.webhooks)
            return 200, core.webhooks.stats.to_dict()
        if route == "webhooks/faults" and method == "POST":
            rule = core.webhooks.inject(WebhookFault(**(payload or {})))
            return 200, {"kind": rule.kind, "count": rule.count, "delay": rule.delay}
        if route == "reset" and method == "POST":
            with model.cond:
                model.reset_locked()
            core.faults.reset()
            core.webhooks.reset()
            return 200, {"reset": True}
        if route == "faults":
            if method == "GET":
                return 200, [f.to_dict() for f in core.faults.list()]
            if method == "DELETE":
                return 200, {"cleared": core.faults.clear()}
            if method == "POST":
                if isinstance(payload, dict) and set(payload) == {"spec"}:
                    fault = Fault.parse(str(payload["spec"]))
                else:
                    fault = Fault.from_dict(payload)
                return 201, core.faults.add(fault).to_dict()
        if route == "requests" and method == "GET":
            with model.cond:
                model.advance_locked(time.monotonic())
                reqs = sorted(model.requests.values(), key=lambda r: r.submitted_at)
                return 200, [model.info_locked(r).to_dict() for r in reqs]
        if route.startswith("requests/") and method == "GET":
            req = model.requests.get(route.removeprefix("requests/"))
            if req is None:
                return 404, {"detail": "Not Found"}
            with model.cond:
                model.advance_locked(time.monotonic())
                return 200, model.info_locked(req).to_dict()
    except (TypeError, ValueError) as exc:
        return 400, {"detail": str(exc)}
    return 404, {"detail": f"no admin route {method} {path}"}
