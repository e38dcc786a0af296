"""The HTTPS server of the fal emulator: TLS per connection, routing, fal's answers.

:class:`~prefect_gptimage.testing.core.EmulatorCore` holds the shared state;
:class:`EmulatorHTTPServer` accepts connections and does each TLS handshake in the connection's
own worker thread, so a slow client never blocks ``accept``; :class:`FalRequestHandler` speaks
fal's queue API (fal-protocol §1), the public media URLs and the ``/_emulator`` admin API.
HTTP/1.1 keep-alive is supported: every answer carries a Content-Length, except the SSE status
stream, which is close-delimited, and a ``huge`` result, which is chunked.

Faults that shape the normal answer rather than replace it: ``stuck`` (status and result answer
202 ``IN_QUEUE`` whatever the request's real state), ``trickle`` (the body goes out 64 bytes at a
time, ``delay`` seconds apart) and ``huge`` (a result of ``size`` bytes, streamed from one small
buffer so the emulator never holds it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ValidationError

from prefect_gptimage.schemas import (
    CONTENT_TYPES,
    EDIT_ENDPOINT,
    TEXT_TO_IMAGE_ENDPOINT,
    GptImageEditRequest,
    GptImageRequest,
)
from prefect_gptimage.testing.admin import handle_admin
from prefect_gptimage.testing.core import EmulatorCore
from prefect_gptimage.testing.faults import (
    RESPONSE_KINDS,
    STUCK_KINDS,
    TRICKLE_PIECE,
    Fault,
    error_type_for,
    ingress_html,
)
from prefect_gptimage.testing.images import OTHER_FORMAT
from prefect_gptimage.testing.records import COMPLETED, EmulatedRequest, Failure

logger = logging.getLogger("prefect_gptimage.testing")

APP = "fal-ai/gpt-image-1.5"
_MODELS: dict[str, type[BaseModel]] = {
    TEXT_TO_IMAGE_ENDPOINT: GptImageRequest,
    EDIT_ENDPOINT: GptImageEditRequest,
}
_JSON_DETAILS = {
    500: "Internal server error",
    502: "The runner returned an incomplete response",
    503: "No runner could be scheduled for the request",
    504: "Request timed out",
}
_MAX_BODY = 64 * 1024 * 1024
_KEEPALIVE_EVERY = 15.0
_TRUTHY = ("1", "true", "yes", "on")
_AFTER_ACCEPT = frozenset({"drop_after_accept", "error_after_accept", "foreign_urls"})
_MEDIA_KINDS = frozenset({"truncate", "wrong_format"})


class _Dropped(Exception):
    """Raised after the connection was cut on purpose; nothing more may be written."""


class _BadRequest(Exception):
    """An HTTP request that cannot be read (bad framing); answered, then the connection closes."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


class EmulatorHTTPServer(ThreadingHTTPServer):
    """Threaded HTTPS server; the TLS handshake runs in the per-connection thread."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024
    allow_reuse_address = True
    handshake_timeout = 10.0

    def __init__(
        self,
        address: tuple[str, int],
        core: EmulatorCore,
        context: ssl.SSLContext,
        family: socket.AddressFamily = socket.AF_INET,
    ) -> None:
        self.address_family = family
        self.core = core
        self.ssl_context = context
        super().__init__(address, FalRequestHandler)

    def server_bind(self) -> None:
        # Skip HTTPServer's reverse-DNS lookup (getfqdn), which can be slow in sandboxes.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(self.handshake_timeout)
        try:
            tls = self.ssl_context.wrap_socket(
                request, server_side=True, do_handshake_on_connect=False
            )
        except OSError:
            return
        self.core.track(tls)
        try:
            tls.do_handshake()
            FalRequestHandler(tls, client_address, self)
        except OSError as exc:  # handshake failures, resets, timeouts
            logger.debug("fal emulator connection ended: %r", exc)
        finally:
            self.core.untrack(tls)
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("fal emulator: error on a connection", exc_info=True)


class FalRequestHandler(BaseHTTPRequestHandler):
    """One connection: fal queue routes, ``/files/...`` media and ``/_emulator/...`` admin."""

    protocol_version = "HTTP/1.1"
    server_version = "fal-emulator/1"
    sys_version = ""
    timeout = 120
    server: EmulatorHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("fal emulator: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing ----------------------------------------------------------------------------

    @property
    def core(self) -> EmulatorCore:
        return self.server.core

    def _dispatch(self, method: str) -> None:
        self._fal_id: str | None = None
        self._trickle = 0.0
        url = urlsplit(self.path)
        try:
            body = self._read_body()
            if url.path == "/_emulator" or url.path.startswith("/_emulator/"):
                self._admin(method, url.path, body)
            elif url.path.startswith("/files/"):
                self._media(method, url.path)
            else:
                self._queue(method, url.path, parse_qs(url.query), body)
        except _Dropped:
            pass
        except _BadRequest as exc:
            self.close_connection = True
            self._json(exc.code, {"detail": exc.detail}, fal=False)
        except OSError:
            self.close_connection = True
        except Exception:
            logger.exception("fal emulator: internal error on %s %s", method, self.path)
            with self.core.model.cond:
                self.core.model.internal_errors += 1
            try:
                self._json(500, {"detail": "fal emulator internal error"}, fal=False)
            except OSError:
                self.close_connection = True

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
                    raise _BadRequest(413, "request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(16)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _BadRequest(400, "bad Content-Length") from None
        if length > _MAX_BODY or length < 0:
            raise _BadRequest(413, "request body too large")
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
                raise _Dropped
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
        raise _Dropped

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
            body = {"detail": _JSON_DETAILS[code], "error_type": etype}
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

    # -- fal queue ---------------------------------------------------------------------------

    def _queue(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        segs = [s for s in path.split("/") if s]
        rid = ""
        if "requests" in segs:
            i = segs.index("requests")
            app_segs, rest = segs[:i], segs[i + 1 :]
            routes = {
                ("GET", 1): "result",
                ("GET", 2, "status"): "status",
                ("GET", 3, "status", "stream"): "status_stream",
                ("PUT", 2, "cancel"): "cancel",
            }
            op = routes.get((method, len(rest), *rest[1:])) if rest else None
            if op is None:
                self._json(405 if rest else 404, {"detail": "Not Found"})
                return
            rid = rest[0]
        elif method == "POST":
            op, app_segs = "submit", segs
        else:
            self._json(404, {"detail": "Not Found"})
            return
        self.core.count(op)
        if not self._authorized():
            return
        app_ok = app_segs[:2] == APP.split("/") and app_segs[2:] in ([], ["edit"])
        if not app_ok:
            name = "/".join(app_segs)
            self._json(404, {"detail": f"Application '{name}' not found"})
            return
        if op == "submit":
            self._submit("/".join(app_segs), body)
            return
        self._fal_id = rid
        req = self.core.model.requests.get(rid)
        if req is None:
            self._json(404, {"status": "NOT_FOUND"} if op == "cancel" else {"detail": "Not Found"})
            return
        fault = self._pre_faults(op, req.endpoint, req.prompt, frozenset())
        if fault is not None:
            self._answer_fault(fault)
            return
        faults = self.core.faults
        if op in ("status", "result") and faults.pick(
            op, STUCK_KINDS, endpoint=req.endpoint, prompt=req.prompt
        ):
            self._stuck(req)
            return
        if op == "result":
            huge = faults.pick(op, ("huge",), endpoint=req.endpoint, prompt=req.prompt)
            if huge is not None:
                self._huge(huge.size or 0)
                return
        with_logs = (query.get("logs") or ["0"])[-1].lower() in _TRUTHY
        if op == "status":
            self._status(req, with_logs)
        elif op == "status_stream":
            self._stream(req, with_logs)
        elif op == "result":
            self._result(req)
        else:
            self._cancel(req)

    def _authorized(self) -> bool:
        if not self.core.require_key:
            return True
        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.strip().partition(" ")
        if scheme == "Key" and token.strip():
            return True
        with self.core.model.cond:
            self.core.model.unauthorized += 1
        detail = "No API key provided" if not auth else "Invalid authorization; expected 'Key ...'"
        self._json(401, {"detail": detail, "error_type": "unauthorized"})
        return False

    def _submit(self, endpoint: str, body: bytes) -> None:
        try:
            raw: Any = json.loads(body or b"null")
        except ValueError:
            raw = None
        prompt = raw.get("prompt") if isinstance(raw, dict) else None
        prompt = prompt if isinstance(prompt, str) else None
        fault = self._pre_faults("submit", endpoint, prompt, frozenset())
        if fault is not None:
            self._answer_fault(fault)
            return
        if not isinstance(raw, dict):
            item = {"loc": ["body"], "msg": "Input should be a JSON object", "type": "model_type"}
            self._json(422, {"detail": [item]})
            return
        try:
            validated = _MODELS[endpoint].model_validate(raw)
        except ValidationError as exc:
            detail = [
                {"loc": ["body", *exc_loc], "msg": err["msg"], "type": err["type"]}
                for err in exc.errors()
                for exc_loc in [list(err["loc"])]
            ]
            self._json(422, {"detail": detail})
            return
        arguments = validated.model_dump(mode="json", exclude_none=True)
        try:
            timeout_header = self.headers.get("X-Fal-Request-Timeout")
            start_timeout = float(timeout_header) if timeout_header else None
            if start_timeout is not None and not start_timeout > 0:
                raise ValueError
        except ValueError:
            msg = "X-Fal-Request-Timeout must be a positive number of seconds"
            self._json(400, {"detail": msg, "error_type": "bad_request"})
            return
        after = self.core.faults.pick(
            "submit", _AFTER_ACCEPT, endpoint=endpoint, prompt=str(arguments["prompt"])
        )
        self._accept(endpoint, arguments, start_timeout, after)

    def _accept(
        self,
        endpoint: str,
        arguments: dict[str, Any],
        start_timeout: float | None,
        after_fault: Fault | None,
    ) -> None:
        core, model = self.core, self.core.model
        rid = str(uuid.uuid4())
        self._fal_id = rid
        now = time.monotonic()
        prompt = str(arguments["prompt"])
        fail = core.faults.pick("submit", ("fail",), endpoint=endpoint, prompt=prompt)
        planned = None
        if fail is not None:
            code = fail.http_status
            if code == 422:
                msg = "The request was rejected by the content policy"
                planned = Failure.validation("prompt", msg, fail.error_type_for_failure())
            else:
                detail = _JSON_DETAILS.get(code, "The request failed")
                planned = Failure.server(code, detail, fail.error_type_for_failure())
        req = EmulatedRequest(
            request_id=rid,
            endpoint=endpoint,
            app=APP,
            arguments=arguments,
            submitted_at=now,
            deadline=None if start_timeout is None else now + start_timeout,
            planned_failure=planned,
            input_check=core.start_input_check(arguments) if endpoint == EDIT_ENDPOINT else None,
            misspell_rate=core.misspell_rate,
        )
        normalized = json.dumps({"endpoint": endpoint, **arguments}, sort_keys=True)
        with model.cond:
            position = model.submit_locked(req, normalized, now)
        if self._slow_after:
            time.sleep(self._slow_after)
        if after_fault is not None and after_fault.kind == "drop_after_accept":
            self._drop()
        if after_fault is not None and after_fault.kind == "error_after_accept":
            code = after_fault.http_status
            etype = error_type_for(code)
            detail = _JSON_DETAILS.get(code, "The request failed")
            self._json(code, {"detail": detail, "error_type": etype}, {"X-Fal-Error-Type": etype})
            return
        url = f"{core.base_url}/{APP}/requests/{rid}"
        if after_fault is not None and after_fault.kind == "foreign_urls":
            url = f"https://foreign.invalid/{APP}/requests/{rid}"  # where the key must not go
        self._json(
            200,
            {
                "status": "IN_QUEUE",
                "request_id": rid,
                "response_url": url,
                "status_url": url + "/status",
                "cancel_url": url + "/cancel",
                "queue_position": position,
            },
        )

    def _status(self, req: EmulatedRequest, with_logs: bool) -> None:
        model = self.core.model
        with model.cond:
            now = time.monotonic()
            model.advance_locked(now)
            body = model.status_body_locked(req, self.core.base_url, with_logs, now)
        self._json(200 if body["status"] == COMPLETED else 202, body)

    def _stuck(self, req: EmulatedRequest) -> None:
        """A ``stuck`` rule: the request looks queued at the head of the line, forever."""
        url = f"{self.core.base_url}/{req.app}/requests/{req.request_id}"
        body = {
            "status": "IN_QUEUE",
            "request_id": req.request_id,
            "response_url": url,
            "status_url": url + "/status",
            "cancel_url": url + "/cancel",
            "logs": None,
            "queue_position": 0,
        }
        self._json(202, body)

    def _huge(self, size: int) -> None:
        """A ``huge`` rule: a result of ``size`` bytes (one sync_mode image), chunked, streamed."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-fal-request-id", self._fal_id or "")
        self.end_headers()
        self.close_connection = True
        head = b'{"images": [{"url": "data:image/png;base64,'
        tail = b'", "content_type": "image/png", "width": 1024, "height": 1024}]}'
        block = b"A" * (1 << 16)
        left = max(0, size - len(head) - len(tail))
        pieces = [head]
        while left > 0 or pieces:
            for piece in pieces:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            if self.core.model.stopped:
                raise _Dropped
            pieces = [block[: min(left, len(block))]] if left > 0 else []
            left -= len(pieces[0]) if pieces else 0
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))

    def _stream(self, req: EmulatedRequest, with_logs: bool) -> None:
        model = self.core.model
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("x-fal-request-id", req.request_id)
        self.end_headers()
        self.close_connection = True
        last_key: tuple[Any, ...] | None = None
        last_write = time.monotonic()
        while True:
            chunk = b""
            done = False
            with model.cond:
                if model.stopped:
                    return
                now = time.monotonic()
                model.advance_locked(now)
                body = model.status_body_locked(req, self.core.base_url, with_logs, now)
                key = (body["status"], body.get("queue_position"), len(body["logs"] or ()))
                if key != last_key:
                    chunk = f"data: {json.dumps(body)}\n\n".encode()
                    last_key, done = key, body["status"] == COMPLETED
                else:
                    wake = [last_write + _KEEPALIVE_EVERY]
                    if with_logs and (t := model.next_log_time_locked(req, now)) is not None:
                        wake.append(t)
                    model.cond.wait(max(0.0, min(wake) - now))
                    if time.monotonic() - last_write >= _KEEPALIVE_EVERY:
                        chunk = b": keep-alive\n\n"
            if chunk:
                self.wfile.write(chunk)
                last_write = time.monotonic()
            if done:
                return

    def _result(self, req: EmulatedRequest) -> None:
        model = self.core.model
        with model.cond:
            now = time.monotonic()
            model.advance_locked(now)
            if req.status != COMPLETED:
                body = model.status_body_locked(req, self.core.base_url, False, now)
                outcome = None
            else:
                body, outcome = None, req.outcome
        if body is not None:
            self._json(202, body)
        elif outcome is not None:
            self._json(outcome.status_code, outcome.body, outcome.headers)
        else:
            self._json(200, self.core.result_body(req))

    def _cancel(self, req: EmulatedRequest) -> None:
        with self.core.model.cond:
            ok = self.core.model.cancel_locked(req, time.monotonic())
        if ok:
            self._json(202, {"status": "CANCELLATION_REQUESTED"})
        else:
            self._json(400, {"status": "ALREADY_COMPLETED"})

    # -- media -------------------------------------------------------------------------------

    def _media(self, method: str, path: str) -> None:
        core = self.core
        core.count("media")
        if method not in ("GET", "HEAD"):
            self._json(405, {"detail": "Method Not Allowed"}, fal=False)
            return
        found = core.media_request(path)
        endpoint, prompt = (found[0].endpoint, found[0].prompt) if found else (None, None)
        fault = self._pre_faults("media", endpoint, prompt, frozenset())
        if fault is not None:
            self._answer_fault(fault, fal_side=False)
            return
        if found is None:
            self._json(404, {"detail": "Not Found"}, fal=False)
            return
        fault = core.faults.pick("media", _MEDIA_KINDS, endpoint=endpoint, prompt=prompt)
        req, index, fmt = found
        served = OTHER_FORMAT[fmt] if fault is not None and fault.kind == "wrong_format" else fmt
        data = core.image_bytes(req, index, served)
        headers = {"Cache-Control": "public, max-age=604800"}
        if fault is not None and fault.kind == "truncate":
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPES[fmt])
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data[: len(data) // 2])
            self._drop()
        self._send(200, data, CONTENT_TYPES[fmt], headers)

    # -- admin -------------------------------------------------------------------------------

    def _admin(self, method: str, path: str, body: bytes) -> None:
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            self._json(400, {"detail": "body is not JSON"}, fal=False)
            return
        code, answer = handle_admin(self.core, method, path, payload)
        self._json(code, answer, fal=False)
