"""The webhook receiver: a small Starlette app that records fal's verified callbacks.

Routes:

- ``POST /fal/webhook`` (and ``POST /``): one callback of fal. Its signature is checked first
  (:class:`~prefect_gptimage.webhooks.verify.Verifier`); a missing, bad or stale one is answered
  401 and changes nothing. A verified one is recorded in the shared result storage under its
  validated request id (:func:`~prefect_gptimage.tasks.callbacks.record_callback`), once: a
  re-delivery is answered 200 and changes nothing. If fal's keys or the storage cannot be
  reached, the answer is 503, so fal delivers it again later (10 times over about 2 hours).
- ``GET /health``: 200 ``{"status": "ok"}`` while the app serves.
- ``GET /stats``: the counters (:class:`ReceiverStats`).

With a :class:`~prefect_gptimage.webhooks.resume.Resumer` (the CLI's ``webhooks serve`` gives
one), each recorded callback, once answered, may resume the suspended flow run waiting for it
(see :mod:`prefect_gptimage.webhooks.resume`).

Nothing here logs a key, a signature or a body: a refusal is logged with its reason only.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from prefect_gptimage.schemas import check_request_id
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.callbacks import FalCallback, record_callback
from prefect_gptimage.webhooks.resume import Resumer
from prefect_gptimage.webhooks.verify import KeysUnavailable, SignatureRejected, Verifier

__all__ = ["WEBHOOK_PATH", "ReceiverStats", "create_app"]

logger = logging.getLogger("prefect_gptimage.webhooks")

#: The path fal is given (``PREFECT_GPTIMAGE_WEBHOOK_URL`` ends with it); ``/`` works too.
WEBHOOK_PATH = "/fal/webhook"
_STRIPES = 64


@dataclass
class ReceiverStats:
    """What the receiver saw since it started.

    ``received``: POSTs; ``refused``: answered 401 (bad, missing or stale signature);
    ``invalid``: signed but unusable (400: not JSON, no or another request id); ``recorded``:
    callbacks written; ``duplicates``: re-deliveries of a recorded one; ``unavailable``:
    answered 503 (fal's keys or the storage out of reach); ``resumed``: suspended flow runs
    resumed (with a resumer).
    """

    received: int = 0
    refused: int = 0
    invalid: int = 0
    recorded: int = 0
    duplicates: int = 0
    unavailable: int = 0
    resumed: int = 0


class _Recorder:
    """Records callbacks, one at a time per request id within this process (across processes,
    ``PREFECT_GPTIMAGE_LOCK_URL`` serializes them as it does submits)."""

    def __init__(self, record: Callable[[FalCallback], bool]) -> None:
        self._record = record
        self._locks = [threading.Lock() for _ in range(_STRIPES)]

    def __call__(self, callback: FalCallback) -> bool:
        with self._locks[hash(callback.request_id) % _STRIPES]:
            return self._record(callback)


def _answer(code: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=code)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The raw body, or None when it is longer than ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _callback(raw: bytes, signed_id: str) -> FalCallback:
    """The callback in ``raw``, for the request id the signature covers (ValueError if not)."""
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError("the body is not a JSON object")
    request_id = check_request_id(body.get("request_id"))
    if request_id != check_request_id(signed_id):
        raise ValueError("the body names another request than the signature")
    return FalCallback.model_validate({k: v for k, v in body.items() if k in _FIELDS})


_FIELDS = frozenset(
    {"request_id", "gateway_request_id", "status", "payload", "error", "payload_error"}
)


def create_app(
    verifier: Verifier,
    record: Callable[[FalCallback], bool] = record_callback,
    resumer: Resumer | None = None,
) -> Starlette:
    """The receiver's ASGI app; ``app.state.stats`` holds its :class:`ReceiverStats`.
    ``resumer``: resumes the suspended flow run a recorded callback completes (after the
    answer to fal is sent, so fal's delivery never waits for Prefect's API)."""
    stats = ReceiverStats()
    recorder = _Recorder(record)
    limit = get_settings().max_result_bytes

    async def receive(request: Request) -> JSONResponse:
        stats.received += 1
        raw = await _read_body(request, limit)
        if raw is None:
            stats.invalid += 1
            return _answer(413, "body too large")
        try:
            signed_id = await run_in_threadpool(verifier.verify, request.headers, raw)
        except SignatureRejected as exc:
            stats.refused += 1
            logger.warning("refused a callback: %s", exc.reason)
            return _answer(401, "invalid webhook signature")
        except KeysUnavailable as exc:
            stats.unavailable += 1
            logger.warning("cannot check a callback now: %s", exc)
            return _answer(503, "fal's keys are unavailable; deliver again later")
        try:
            callback = _callback(raw, signed_id)
        except ValueError as exc:  # JSON and validation errors are ValueErrors too
            stats.invalid += 1
            logger.warning("a signed callback is unusable: %s", str(exc).splitlines()[0])
            return _answer(400, "unusable callback body")
        try:
            new = await run_in_threadpool(recorder, callback)
        except Exception as exc:
            stats.unavailable += 1
            logger.warning("cannot record the callback of %s: %r", callback.request_id, exc)
            return _answer(503, "storage unavailable; deliver again later")
        if new:
            stats.recorded += 1
            logger.info("recorded the callback of %s (%s)", callback.request_id, callback.status)
        else:
            stats.duplicates += 1
        # a re-delivery too: the run may have suspended after the first one (the race)
        after = BackgroundTask(resumer.on_callback, callback.request_id) if resumer else None
        return JSONResponse({"request_id": callback.request_id, "recorded": new}, background=after)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def show_stats(request: Request) -> JSONResponse:
        if resumer is not None:
            stats.resumed = resumer.resumed
        return JSONResponse(asdict(stats))

    app = Starlette(
        routes=[
            Route(WEBHOOK_PATH, receive, methods=["POST"]),
            Route("/", receive, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/stats", show_stats, methods=["GET"]),
        ]
    )
    app.state.stats = stats
    return app
