"""The HTTPS server of the fal emulator: TLS per connection, routing, fal's answers.

:class:`~prefect_gptimage.testing.core.EmulatorCore` holds the shared state;
:class:`EmulatorHTTPServer` accepts connections and does each TLS handshake in the connection's
own worker thread, so a slow client never blocks ``accept``; :class:`FalRequestHandler` speaks
fal's queue API (fal-protocol §1), the public media URLs and the ``/_emulator`` admin API.
HTTP/1.1 keep-alive is supported: every answer carries a Content-Length, except the SSE status
stream, which is close-delimited, and a ``huge`` result, which is chunked.

The handler is layered: :mod:`._handler_base` (reading, answering, fault answers),
:mod:`._queue_answers` (fal's queue API, and the faults that shape its answers), and here the
routing, the media files and the admin API.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from http.server import ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prefect_gptimage.schemas import CONTENT_TYPES
from prefect_gptimage.testing._handler_base import BadRequest, Dropped
from prefect_gptimage.testing._queue_answers import APP, QueueAnswers
from prefect_gptimage.testing.admin import handle_admin
from prefect_gptimage.testing.core import EmulatorCore
from prefect_gptimage.testing.images import OTHER_FORMAT
from prefect_gptimage.testing.platform_api import PLATFORM_PREFIX, answer_platform
from prefect_gptimage.testing.webhooks import JWKS_PATH

__all__ = ["APP", "EmulatorHTTPServer", "FalRequestHandler"]

logger = logging.getLogger("prefect_gptimage.testing")

_MEDIA_KINDS = frozenset({"truncate", "wrong_format"})


class EmulatorHTTPServer(ThreadingHTTPServer):
    """Threaded HTTPS server; the TLS handshake runs in the per-connection thread."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024
    allow_reuse_address = True
    #: Seconds a client may take over its TLS handshake: generous, as a loaded machine's client
    #: threads can be starved for many seconds (a cut handshake looks like a fal outage)
    handshake_timeout = 60.0

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


class FalRequestHandler(QueueAnswers):
    """One connection: fal queue routes, ``/files/...`` media and ``/_emulator/...`` admin."""

    server: EmulatorHTTPServer

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

    # -- routing ---------------------------------------------------------------------------

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
            elif url.path.startswith(PLATFORM_PREFIX):  # fal's platform API (pricing, billing)
                self._platform(method, url.path, parse_qs(url.query), body)
            elif url.path == JWKS_PATH and method == "GET":
                self._json(200, self.core.webhooks.jwks(), fal=False)
            else:
                self._queue(method, url.path, parse_qs(url.query), body)
        except Dropped:
            pass
        except BadRequest as exc:
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

    def _platform(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        auth = self.headers.get("Authorization", "")
        code, answer = answer_platform(self.core, method, path, query, payload, auth)
        self._json(code, answer, fal=False)

    # -- admin -------------------------------------------------------------------------------

    def _admin(self, method: str, path: str, body: bytes) -> None:
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            self._json(400, {"detail": "body is not JSON"}, fal=False)
            return
        code, answer = handle_admin(self.core, method, path, payload)
        self._json(code, answer, fal=False)
