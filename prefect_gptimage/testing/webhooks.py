"""The emulator's webhooks: fal's signed completion callbacks, with the ways they go wrong.

A submit carrying ``?fal_webhook=URL`` (fal-protocol §3) is noted; when the request ends
(completed, failed, cancelled or timed out before it started) the emulator POSTs fal's callback
body ``{request_id, gateway_request_id, status: OK|ERROR, payload, error, payload_error}`` to
the URL, signed as fal signs it: ED25519, with the emulator's own key, over the four lines
``request_id``, ``user_id``, ``timestamp`` and ``sha256_hex(raw body)``, sent in the headers
``X-Fal-Webhook-Request-Id``, ``-User-Id``, ``-Timestamp`` and ``-Signature`` (hex). The public
key is served as a JWKS at ``/.well-known/jwks.json`` (``kty: OKP``, ``crv: Ed25519``). A
delivery that fails (no connection, or not a 2xx) is retried after each of
:attr:`WebhookSender.retry_delays` (fal: 10 times over about 2 hours; here seconds, so tests
can wait for it). The emulator's scheduler advances time on its own, so callbacks go out with
nobody polling.

Faults (:class:`WebhookFault`, one per ended request, rules in the order they were injected):

- ``drop``: the callback is lost on the way: never seen, never retried;
- ``never``: fal never calls for the request (a wrong URL, an outage): the same, counted apart;
- ``duplicate``: the callback comes twice;
- ``forge``: before the real one, a forgery with a tampered payload signed by another key;
- ``replay``: before the real one, a genuinely signed copy with an hour-old timestamp;
- ``late``: the callback goes out ``delay`` seconds after the request ended.

:class:`WebhookStats` counts what was sent and what the receiver answered.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import heapq
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from prefect_gptimage.testing.records import COMPLETED, EmulatedRequest
from prefect_gptimage.testing.state import QueueModel

__all__ = [
    "JWKS_PATH",
    "USER_ID",
    "WEBHOOK_FAULT_KINDS",
    "WebhookFault",
    "WebhookSender",
    "WebhookStats",
    "sign",
]

#: Where the emulator serves its public keys (as fal does under ``rest.alpha.fal.ai``).
JWKS_PATH = "/.well-known/jwks.json"
#: The ``X-Fal-Webhook-User-Id`` the emulator signs with.
USER_ID = "emulator-user"
WebhookFaultKind = Literal["drop", "never", "duplicate", "forge", "replay", "late"]
#: Every webhook fault kind.
WEBHOOK_FAULT_KINDS: tuple[str, ...] = get_args(WebhookFaultKind)
#: How old a replayed callback's timestamp is, in seconds.
REPLAY_AGE = 3600
_DELIVERY_TIMEOUT = 15.0  # fal's per-attempt timeout, as third parties quote it
_TICK = 0.05


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign(
    key: Ed25519PrivateKey, request_id: str, body: bytes, timestamp: int, user_id: str = USER_ID
) -> dict[str, str]:
    """fal's four webhook headers for ``body``, signed with ``key`` at ``timestamp``."""
    message = "\n".join(
        [request_id, user_id, str(timestamp), hashlib.sha256(body).hexdigest()]
    ).encode()
    return {
        "Content-Type": "application/json",
        "X-Fal-Webhook-Request-Id": request_id,
        "X-Fal-Webhook-User-Id": user_id,
        "X-Fal-Webhook-Timestamp": str(timestamp),
        "X-Fal-Webhook-Signature": key.sign(message).hex(),
    }


@dataclass
class WebhookFault:
    """A rule that spoils the callbacks of the next ``count`` requests that end (None: all).

    ``delay``: seconds a ``late`` callback waits. ``fired`` counts the requests it spoiled.
    """

    kind: WebhookFaultKind
    count: int | None = 1
    delay: float = 0.0
    fired: int = 0

    def __post_init__(self) -> None:
        if self.kind not in WEBHOOK_FAULT_KINDS:
            raise ValueError(f"unknown webhook fault {self.kind!r}; one of {WEBHOOK_FAULT_KINDS}")

    @property
    def spent(self) -> bool:
        """Whether the rule has spoiled all the callbacks it was for."""
        return self.count is not None and self.fired >= self.count


@dataclass(frozen=True)
class WebhookStats:
    """Counters of the emulator's webhooks (``emu.webhooks.stats``).

    ``registered``: submits that carried a webhook URL (``low_priority`` of all submits asked for
    ``X-Fal-Queue-Priority: low``). ``attempts``: POSTs of genuine callbacks (``delivered`` of
    them answered 2xx, ``failed_attempts`` not; ``given_up`` callbacks ran out of retries).
    ``forged_sent``/``replayed_sent``/``duplicates_sent``: extra POSTs by fault, and
    ``forged_refused``/``replayed_refused`` how many of those the receiver answered 401.
    ``dropped``/``never``/``late``: callbacks lost or delayed by a fault.
    ``delivered_ids``: request ids whose genuine callback got a 2xx, each once.
    """

    registered: int
    low_priority: int
    attempts: int
    delivered: int
    failed_attempts: int
    given_up: int
    forged_sent: int
    forged_refused: int
    replayed_sent: int
    replayed_refused: int
    duplicates_sent: int
    dropped: int
    never: int
    late: int
    delivered_ids: frozenset[str] = field(default_factory=frozenset)

    def to_dict(self) -> dict[str, Any]:
        """The counters as a JSON-ready dict."""
        out = dict(self.__dict__)
        out["delivered_ids"] = sorted(self.delivered_ids)
        return out


@dataclass
class _Delivery:
    request_id: str
    url: str
    body: bytes
    what: str  # genuine, duplicate, forge, replay
    attempt: int = 0


class WebhookSender:
    """Delivers one emulator's callbacks (see the module docs); owned by its core.

    ``body_of(req)`` gives a request's result body (the OK payload). ``retry_delays``: seconds
    before each retry of a genuine callback that failed (changeable at any time).
    """

    def __init__(
        self,
        model: QueueModel,
        body_of: Callable[[EmulatedRequest], dict[str, Any]],
        retry_delays: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 240.0),
    ) -> None:
        self.model = model
        self.retry_delays = retry_delays
        self._body_of = body_of
        self._key = Ed25519PrivateKey.generate()
        self._forger = Ed25519PrivateKey.generate()
        self.kid = hashlib.sha256(_raw_public(self._key)).hexdigest()[:16]
        self._lock = threading.Lock()
        self._targets: dict[str, str] = {}  # request id -> URL, until the request ends
        self._due: list[tuple[float, int, _Delivery]] = []
        self._seq = itertools.count()
        self._faults: list[WebhookFault] = []
        self._counts: Counter[str] = Counter()
        self._delivered: set[str] = set()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._http: httpx.Client | None = None

    # -- configuration -----------------------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        """The public key set fal serves: one ``OKP``/``Ed25519`` key, ``x`` in base64url."""
        x = _b64url(_raw_public(self._key))
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "use": "sig"}]}

    def sign(self, request_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """The emulator's genuine signature headers for ``body`` (tests build callbacks with it)."""
        return sign(
            self._key, request_id, body, int(time.time()) if timestamp is None else timestamp
        )

    def inject(self, fault: WebhookFault) -> WebhookFault:
        """Add a fault rule; returns it (its ``fired`` counter updates live)."""
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Remove every fault rule."""
        with self._lock:
            self._faults.clear()

    def reset(self) -> None:
        """Forget targets, pending deliveries, faults and counters."""
        with self._lock:
            self._targets.clear()
            self._due.clear()
            self._faults.clear()
            self._counts.clear()
            self._delivered.clear()

    @property
    def stats(self) -> WebhookStats:
        """A snapshot of the counters."""
        with self._lock:
            c = self._counts
            return WebhookStats(
                **{
                    name: c[name]
                    for name in WebhookStats.__dataclass_fields__
                    if name != "delivered_ids"
                },
                delivered_ids=frozenset(self._delivered),
            )

    def note_submit(self, request_id: str, url: str | None, priority: str | None) -> None:
        """A submit was accepted: call ``url`` (if any) when it ends."""
        with self._lock:
            if priority is not None and priority.lower() == "low":
                self._counts["low_priority"] += 1
            if url:
                self._targets[request_id] = url
                self._counts["registered"] += 1

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the delivery thread (again after :meth:`stop`)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopped.clear()
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="fal-emulator-webhook")
        self._http = httpx.Client(timeout=_DELIVERY_TIMEOUT)
        self._thread = threading.Thread(target=self._run, daemon=True, name="fal-emulator-webhooks")
        self._thread.start()

    def stop(self) -> None:
        """Stop delivering (pending deliveries stay queued for a restart)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._http is not None:
            self._http.close()
            self._http = None

    # -- delivery ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped.wait(_TICK):
            self._collect_ended()
            now = time.monotonic()
            ready: list[_Delivery] = []
            with self._lock:
                while self._due and self._due[0][0] <= now:
                    ready.append(heapq.heappop(self._due)[2])
            pool = self._pool
            for delivery in ready:
                if pool is None:
                    return
                with contextlib.suppress(RuntimeError):  # shut down meanwhile
                    pool.submit(self._attempt, delivery)

    def _collect_ended(self) -> None:
        with self._lock:
            waiting = list(self._targets.items())
        if not waiting:
            return
        ended: list[tuple[EmulatedRequest, str]] = []
        with self.model.cond:
            self.model.advance_locked(time.monotonic())
            for rid, url in waiting:
                req = self.model.requests.get(rid)
                if req is not None and req.status == COMPLETED:
                    ended.append((req, url))
        for req, url in ended:
            self._schedule(req, url, self._callback_body(req))

    def _callback_body(self, req: EmulatedRequest) -> dict[str, Any]:
        rid = req.request_id
        outcome = req.outcome
        if outcome is None:
            return {
                "request_id": rid,
                "gateway_request_id": rid,
                "status": "OK",
                "payload": self._body_of(req),
                "error": None,
                "payload_error": None,
            }
        return {
            "request_id": rid,
            "gateway_request_id": rid,
            "status": "ERROR",
            "payload": outcome.body,
            "error": f"Invalid status code: {outcome.status_code}",
            "payload_error": None,
        }

    def _schedule(self, req: EmulatedRequest, url: str, body: dict[str, Any]) -> None:
        rid = req.request_id
        raw = json.dumps(body).encode()
        now = time.monotonic()
        with self._lock:
            if self._targets.pop(rid, None) is None:
                return
            fault = next((f for f in self._faults if not f.spent), None)
            if fault is not None:
                fault.fired += 1
            kind = fault.kind if fault is not None else None
            plan: list[tuple[float, _Delivery]] = []
            if kind in ("drop", "never"):
                self._counts["dropped" if kind == "drop" else "never"] += 1
            else:
                if kind == "forge":
                    forged = dict(body, payload=_tampered(body.get("payload")))
                    plan.append((now, _Delivery(rid, url, json.dumps(forged).encode(), "forge")))
                elif kind == "replay":
                    plan.append((now, _Delivery(rid, url, raw, "replay")))
                delay = fault.delay if fault is not None and kind == "late" else 0.0
                if kind == "late":
                    self._counts["late"] += 1
                # extra deliveries go first; the genuine one a moment later
                start = now + (0.2 if plan else 0.0) + delay
                plan.append((start, _Delivery(rid, url, raw, "genuine")))
                if kind == "duplicate":
                    plan.append((start + 0.2, _Delivery(rid, url, raw, "duplicate")))
            for due, delivery in plan:
                heapq.heappush(self._due, (due, next(self._seq), delivery))

    def _attempt(self, delivery: _Delivery) -> None:
        http = self._http
        if http is None:
            return
        what = delivery.what
        if what == "forge":
            headers = sign(self._forger, delivery.request_id, delivery.body, int(time.time()))
        elif what == "replay":
            headers = self.sign(delivery.request_id, delivery.body, int(time.time()) - REPLAY_AGE)
        else:
            headers = self.sign(delivery.request_id, delivery.body)
        code: int | None
        try:
            code = http.post(delivery.url, content=delivery.body, headers=headers).status_code
        except httpx.HTTPError:
            code = None
        ok = code is not None and 200 <= code < 300
        with self._lock:
            c = self._counts
            if what in ("forge", "replay"):
                name = "forged" if what == "forge" else "replayed"
                c[f"{name}_sent"] += 1
                c[f"{name}_refused"] += code == 401
                return
            if what == "duplicate":
                c["duplicates_sent"] += 1
                return
            c["attempts"] += 1
            if ok:
                c["delivered"] += 1
                self._delivered.add(delivery.request_id)
                return
            c["failed_attempts"] += 1
            if delivery.attempt >= len(self.retry_delays):
                c["given_up"] += 1
                return
            due = time.monotonic() + self.retry_delays[delivery.attempt]
            delivery.attempt += 1
            heapq.heappush(self._due, (due, next(self._seq), delivery))


def _tampered(payload: Any) -> Any:
    """What a forger sends: the images pointed elsewhere."""
    if isinstance(payload, dict) and isinstance(payload.get("images"), list):
        images = [dict(img, url="https://forged.invalid/x.png") for img in payload["images"]]
        return dict(payload, images=images)
    return {"images": [{"url": "https://forged.invalid/x.png"}]}
