"""The fal emulator's request handler, its plumbing: reading bodies, answering, faults.

:class:`HandlerBase` holds what every answer uses: the request body reader (Content-Length or
chunked, bounded), ``_send``/``_json`` (always a Content-Length, so keep-alive works), the
``trickle`` writer, a deliberate connection drop, and the fault answers that replace a normal
answer (``drop``, ``echo_key``, ``429``, the JSON and HTML 5xx styles, ``404``).
:mod:`prefect_gptimage.testing._queue_answers` builds fal's queue API on it and
:mod:`prefect_gptimage.testing.server` routes to it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler
from typing import Any, cast

from prefect_gptimage.testing.core import EmulatorCore
from prefect_gptimage.testing.faults import (
    RESPONSE_KINDS,
    TRICKLE_PIECE,
    Fault,
    error_type_for,
    ingress_html,
)

logger = logging.getLogger("prefect_gptimage.testing")

JSON_DETAILS = {
    500: "Internal server error",
    502: "The runner returned an incomplete response",
    503: "No runner could be scheduled for the request",
    504: "Request timed out",
}
_MAX_BODY = 64 * 1024 * 1024


class Dropped(Exception):
    """Raised after the connection was cut on purpose; nothing more may be written."""


class BadRequest(Exception):
    """An HTTP request that cannot be read (bad framing); answered, then the connection closes."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


class HandlerBase(BaseHTTPRequestHandler):
    """One connection's plumbing (see the module docs); the server gives it the core."""

    protocol_version = "HTTP/1.1"
    server_version = "fal-emulator/1"
    sys_version = ""
    timeout = 120
    _fal_id: str | None = None
    _trickle = 0.0
    _slow_after = 0.0

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("fal emulator: " + format, *args)

    @property
    def core(self) -> EmulatorCore:
        return cast(EmulatorCore, cast(Any, self.server).core)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65536) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > _MAX_BODY:
                    raise BadRequest(413, "request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(16)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest(400, "bad Content-Length") from None
        if length > _MAX_BODY or length < 0:
            raise BadRequest(413, "request body too large")
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        code: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        *,
        length: int | None = None,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self._write(body)

    def _write(self, body: bytes) -> None:
        """Write ``body``; under a ``trickle`` rule, 64 bytes at a time, slowly."""
        if not self._trickle:
            self.wfile.write(body)
            return
        for i in range(0, len(body), TRICKLE_PIECE):
            if self.core.model.stopped:
                raise Dropped
            self.wfile.write(body[i : i + TRICKLE_PIECE])
            self.wfile.flush()
            time.sleep(self._trickle)

    def _json(
        self, code: int, obj: Any, headers: dict[str, str] | None = None, *, fal: bool = True
    ) -> None:
        all_headers = dict(headers or {})
        if fal:
            all_headers.setdefault("x-fal-request-id", self._fal_id or str(uuid.uuid4()))
        self._send(code, json.dumps(obj).encode(), "application/json", all_headers)

    def _drop(self) -> None:
        """Cut the connection without an answer."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        raise Dropped

    def _answer_fault(self, fault: Fault, *, fal_side: bool = True) -> None:
        kind, code = fault.kind, fault.http_status
        if kind == "drop":
            self._drop()
        elif kind == "echo_key":  # a careless proxy: its 401 repeats the credentials it was sent
            echoed = self.headers.get("Authorization", "")
            self._json(401, {"detail": f"invalid credentials in header: Authorization: {echoed}"})
        elif kind == "429":
            detail = {"detail": "Too many requests", "error_type": "rate_limited"}
            self._json(429, detail, {"X-Fal-Error-Type": "rate_limited"})
        elif kind.endswith("_json"):
            etype = error_type_for(code)
            body = {"detail": JSON_DETAILS[code], "error_type": etype}
            self._json(code, body, {"X-Fal-Error-Type": etype})
        elif kind.endswith("_ingress"):
            self._send(code, ingress_html(code), "text/html")
        elif kind == "404":
            self._json(404, {"detail": "Not Found"}, fal=fal_side)
        else:  # pragma: no cover - guarded by the callers' kind sets
            raise ValueError(f"fault kind {kind!r} cannot answer here")

    def _pre_faults(
        self, operation: str, endpoint: str | None, prompt: str | None, extra: frozenset[str]
    ) -> Fault | None:
        """Sleep for a ``slow`` rule, then return the answering rule that fires, if any."""
        faults = self.core.faults
        slow = faults.pick(operation, ("slow",), endpoint=endpoint, prompt=prompt)
        if slow is not None and operation != "submit":
            time.sleep(slow.delay)
        fault = faults.pick(operation, RESPONSE_KINDS | extra, endpoint=endpoint, prompt=prompt)
        self._slow_after = slow.delay if slow is not None and operation == "submit" else 0.0
        trickle = faults.pick(operation, ("trickle",), endpoint=endpoint, prompt=prompt)
        self._trickle = trickle.delay if trickle is not None and fault is None else 0.0
        return fault
