"""Shared state of one fal emulator: the queue model, fault rules, images, input fetching.

Every connection's handler (:mod:`prefect_gptimage.testing.server`) works on one
:class:`EmulatorCore`; :class:`~prefect_gptimage.testing.FalEmulator` owns it.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from prefect_gptimage.schemas import CONTENT_TYPES
from prefect_gptimage.testing.faults import FaultBook
from prefect_gptimage.testing.images import (
    ImageFactory,
    misspell,
    quoted_text,
    resolve_size,
    variant_for,
)
from prefect_gptimage.testing.inputs import InputFetcher
from prefect_gptimage.testing.platform_api import PlatformState
from prefect_gptimage.testing.records import COMPLETED, EmulatedRequest, EmulatorStats, Failure
from prefect_gptimage.testing.state import QueueModel
from prefect_gptimage.testing.webhooks import WebhookSender


def check_rate(rate: float) -> float:
    """A misspelling rate: a probability, 0..1."""
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"misspell_rate must be between 0 and 1, got {rate}")
    return rate


class EmulatorCore:
    """State shared by every connection of one emulator."""

    def __init__(
        self,
        *,
        latency: float,
        concurrency_limit: int,
        require_key: bool,
        seed: int | None,
        misspell_rate: float = 0.0,
    ) -> None:
        self.model = QueueModel(latency, concurrency_limit)
        self.faults = FaultBook(seed)
        self.images = ImageFactory()
        self.misspell_rate = check_rate(misspell_rate)
        # misspellings are a hash of this, the quoted text, the submission and the image index
        self.text_seed = str(seed) if seed is not None else secrets.token_hex(8)
        self.require_key = require_key
        self.platform = PlatformState()  # fal's platform API: prices, billing events
        self.base_url = ""
        self.own_netlocs: set[str] = set()
        self.fetcher: InputFetcher | None = None
        self.webhooks = WebhookSender(self.model, self.result_body)  # fal's signed callbacks
        self._executor: ThreadPoolExecutor | None = None
        self._conn_lock = threading.Lock()
        self._connections: set[socket.socket] = set()

    # -- connections -------------------------------------------------------------------------

    def track(self, sock: socket.socket) -> None:
        with self._conn_lock:
            self._connections.add(sock)

    def untrack(self, sock: socket.socket) -> None:
        with self._conn_lock:
            self._connections.discard(sock)

    def close_connections(self) -> None:
        with self._conn_lock:
            conns = list(self._connections)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def shutdown(self) -> None:
        with self.model.cond:
            self.model.stopped = True
            self.model.cond.notify_all()
        self.close_connections()
        self.webhooks.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self.fetcher is not None:
            self.fetcher.close()

    # -- helpers -----------------------------------------------------------------------------

    def count(self, operation: str) -> None:
        with self.model.cond:
            self.model.calls[operation] += 1

    def stats(self) -> EmulatorStats:
        with self.model.cond:
            self.model.advance_locked(time.monotonic())
            return self.model.stats_locked(self.faults.fired_total, dict(self.faults.fired_by_kind))

    def start_input_check(
        self, arguments: dict[str, Any], read: list[tuple[str, str]] | None = None
    ) -> Future[Failure | None]:
        fetcher = self.fetcher
        if fetcher is None:
            raise RuntimeError("emulator not started")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(8, thread_name_prefix="fal-emulator-inputs")
        return self._executor.submit(fetcher.check, arguments, read)

    def image_text(self, req: EmulatedRequest, index: int) -> str:
        """The text drawn into image ``index`` of ``req``: the prompt's quoted text, maybe
        misspelled. Which submissions are misspelled depends only on the seed, the text, how many
        identical inputs were submitted before (``req.ordinal``) and ``index``."""
        text = quoted_text(req.prompt)
        key = f"{self.text_seed}\x00{text}\x00{req.ordinal}\x00{index}"
        return misspell(text, req.misspell_rate, key) if text else ""

    def image_bytes(self, req: EmulatedRequest, index: int, fmt: str | None = None) -> bytes:
        args = req.arguments
        width, height = resolve_size(str(args.get("image_size", "1024x1024")))
        return self.images.render(
            width,
            height,
            fmt or str(args.get("output_format", "png")),
            transparent=args.get("background") == "transparent",
            variant=variant_for(req.prompt, index),
            text=self.image_text(req, index),
        )

    def result_body(self, req: EmulatedRequest) -> dict[str, Any]:
        """fal's output: ``{"images": [{url, content_type, file_name, file_size, ...}]}``."""
        args = req.arguments
        fmt = str(args.get("output_format", "png"))
        width, height = resolve_size(str(args.get("image_size", "1024x1024")))
        images = []
        for i in range(req.num_images):
            data = self.image_bytes(req, i)
            if args.get("sync_mode"):
                url = f"data:{CONTENT_TYPES[fmt]};base64,{base64.b64encode(data).decode()}"
            else:
                url = f"{self.base_url}/files/{req.request_id}/{i}.{fmt}"
            name = uuid.uuid5(uuid.NAMESPACE_URL, f"{req.request_id}/{i}")
            images.append(
                {
                    "url": url,
                    "content_type": CONTENT_TYPES[fmt],
                    "file_name": f"{name}.{fmt}",
                    "file_size": len(data),
                    "width": width,
                    "height": height,
                }
            )
        return {"images": images}

    def media_request(self, path: str) -> tuple[EmulatedRequest, int, str] | None:
        """``/files/{id}/{i}.{ext}`` → (request, index, format) of a served file, or None."""
        parts = path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "files":
            return None
        req = self.model.requests.get(parts[1])
        stem, _, ext = parts[2].partition(".")
        if req is None or not stem.isdigit():
            return None
        index, fmt = int(stem), str(req.arguments.get("output_format", "png"))
        if ext.replace("jpg", "jpeg") != fmt or index >= req.num_images:
            return None
        if req.status != COMPLETED or req.outcome is not None or req.arguments.get("sync_mode"):
            return None
        return req, index, fmt

    def resolve_own(self, url: str) -> Any:
        """Bytes of one of our own media URLs (None if missing), ``...`` if not ours."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or parts.netloc not in self.own_netlocs:
            return ...
        found = self.media_request(parts.path)
        return None if found is None else self.image_bytes(found[0], found[1])
