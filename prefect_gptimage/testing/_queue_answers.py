"""fal's queue API, as the emulator answers it: submit, status (polled or streamed), result,
cancel (fal-protocol §1), with the faults that shape an answer rather than replace it.

``stuck`` (status and result answer 202 ``IN_QUEUE`` whatever the request's real state),
``trickle`` (the body goes out 64 bytes at a time, ``delay`` seconds apart, see
:mod:`._handler_base`) and ``huge`` (a result of ``size`` bytes, streamed from one small buffer so
the emulator never holds it).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ValidationError

from prefect_gptimage.schemas import (
    EDIT_ENDPOINT,
    TEXT_TO_IMAGE_ENDPOINT,
    GptImageEditRequest,
    GptImageRequest,
)
from prefect_gptimage.testing._handler_base import (
    JSON_DETAILS,
    Dropped,
    HandlerBase,
)
from prefect_gptimage.testing.faults import (
    FORGED_ID_KINDS,
    STUCK_KINDS,
    Fault,
    error_type_for,
    forged_id,
)
from prefect_gptimage.testing.records import COMPLETED, EmulatedRequest, Failure

APP = "fal-ai/gpt-image-1.5"
_MODELS: dict[str, type[BaseModel]] = {
    TEXT_TO_IMAGE_ENDPOINT: GptImageRequest,
    EDIT_ENDPOINT: GptImageEditRequest,
}
_KEEPALIVE_EVERY = 15.0
_TRUTHY = ("1", "true", "yes", "on")
_AFTER_ACCEPT = frozenset({"drop_after_accept", "error_after_accept", "foreign_urls"}) | (
    FORGED_ID_KINDS
)
#: ``model.calls`` key of queue calls that name no request the emulator knows.
STRAY = "stray"


class QueueAnswers(HandlerBase):
    """The queue routes of one connection (``_queue`` is the entry point)."""

    _webhook: str | None = None  # the submit's ``fal_webhook`` (see .webhooks)

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
                self.core.count(STRAY)
                self._json(405 if rest else 404, {"detail": "Not Found"})
                return
            rid = rest[0]
        elif method == "POST":
            op, app_segs = "submit", segs
        else:
            self.core.count(STRAY)
            self._json(404, {"detail": "Not Found"})
            return
        self.core.count(op)
        if not self._authorized():
            return
        app_ok = app_segs[:2] == APP.split("/") and app_segs[2:] in ([], ["edit"])
        if not app_ok:
            self.core.count(STRAY)
            name = "/".join(app_segs)
            self._json(404, {"detail": f"Application '{name}' not found"})
            return
        if op == "submit":
            hooks = query.get("fal_webhook")  # fal calls it when the request ends: .webhooks
            self._webhook = hooks[-1] if hooks else None
            self._submit("/".join(app_segs), body)
            return
        self._fal_id = rid
        req = self.core.model.requests.get(rid)
        if req is None:
            self.core.count(STRAY)
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
                detail = JSON_DETAILS.get(code, "The request failed")
                planned = Failure.server(code, detail, fail.error_type_for_failure())
        read: list[tuple[str, str]] = []  # the input check's record: (field, sha256)
        req = EmulatedRequest(
            request_id=rid,
            endpoint=endpoint,
            app=APP,
            arguments=arguments,
            submitted_at=now,
            deadline=None if start_timeout is None else now + start_timeout,
            planned_failure=planned,
            input_check=(
                core.start_input_check(arguments, read) if endpoint == EDIT_ENDPOINT else None
            ),
            misspell_rate=core.misspell_rate,
            inputs_read=read,
            headers={
                k.lower(): v for k, v in self.headers.items() if k.lower().startswith("x-fal-")
            },
        )
        normalized = json.dumps({"endpoint": endpoint, **arguments}, sort_keys=True)
        priority = self.headers.get("X-Fal-Queue-Priority")
        core.webhooks.note_submit(rid, self._webhook, priority)
        with model.cond:
            position = model.submit_locked(req, normalized, now)
            if after_fault is not None and after_fault.kind in FORGED_ID_KINDS:
                other = next((r for r in reversed(model.requests) if r != rid), rid)
                rid = forged_id(after_fault.kind, rid, other)
                self._fal_id = rid
        if self._slow_after:
            time.sleep(self._slow_after)
        if after_fault is not None and after_fault.kind == "drop_after_accept":
            self._drop()
        if after_fault is not None and after_fault.kind == "error_after_accept":
            code = after_fault.http_status
            etype = error_type_for(code)
            detail = JSON_DETAILS.get(code, "The request failed")
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
                raise Dropped
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
            body = self.core.result_body(req)
            few = ("few_images",)
            if self.core.faults.pick("result", few, endpoint=req.endpoint, prompt=req.prompt):
                body["images"] = body["images"][:-1]  # fal ran (and bills) it: one image short
            self._json(200, body)

    def _cancel(self, req: EmulatedRequest) -> None:
        with self.core.model.cond:
            ok = self.core.model.cancel_locked(req, time.monotonic())
        if ok:
            self._json(202, {"status": "CANCELLATION_REQUESTED"})
        else:
            self._json(400, {"status": "ALREADY_COMPLETED"})
