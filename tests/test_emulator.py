"""Tests of the fal emulator (``prefect_gptimage.testing``).

fal_client is used unmodified, over real HTTPS. It reads its hosts from the environment when it
is first imported, so every fal_client call runs in one helper subprocess (started with the
emulator's ``env()``), which works whatever this test process has already imported. Raw protocol
shapes (status codes, headers, bodies) are checked with plain httpx.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import certifi
import httpx
import pytest
from PIL import Image

from prefect_gptimage.testing import FalEmulator, Fault
from prefect_gptimage.testing.faults import FaultBook
from prefect_gptimage.testing.images import ImageFactory, sniff_format, variant_for

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
T2I = "fal-ai/gpt-image-1.5"
EDIT = "fal-ai/gpt-image-1.5/edit"
LATENCY = 0.1

# A long-lived fal_client process: one JSON command per stdin line, one JSON answer per line.
WORKER = r"""
import dataclasses, json, sys
import fal_client
from fal_client.client import SyncRequestHandle

client = fal_client.SyncClient(key="test-key")

def describe(status):
    return {"type": type(status).__name__, **dataclasses.asdict(status)}

def run(cmd):
    op, app = cmd["op"], cmd.get("app")
    if op == "config":
        return {"queue_url": fal_client.client.QUEUE_URL_FORMAT}
    if op == "submit":
        h = client.submit(app, cmd["args"], **cmd.get("kw", {}))
        return {"request_id": h.request_id, "status_url": h.status_url,
                "response_url": h.response_url, "cancel_url": h.cancel_url}
    if op == "subscribe":
        events = []
        result = client.subscribe(app, cmd["args"], with_logs=True, interval=0.02,
                                  on_queue_update=lambda s: events.append(describe(s)))
        return {"result": result, "events": events}
    if op == "run_handle":
        h = client.submit(app, cmd["args"])
        result = h.get(interval=0.02)
        return {"request_id": h.request_id, "status_url": h.status_url, "result": result,
                "status": describe(h.status(with_logs=True))}
    if op == "status":
        return describe(client.status(app, cmd["request_id"], with_logs=cmd.get("logs", False)))
    if op == "result":
        return client.result(app, cmd["request_id"])
    if op == "cancel":
        client.cancel(app, cmd["request_id"])
        return None
    raise ValueError(op)

for line in sys.stdin:
    cmd = json.loads(line)
    try:
        answer = {"ok": run(cmd)}
    except fal_client.FalClientHTTPError as exc:
        answer = {"error": {"type": type(exc).__name__, "status_code": exc.status_code,
                            "message": exc.message, "error_type": exc.error_type,
                            "headers": {k.lower(): v for k, v in exc.response_headers.items()}}}
    except Exception as exc:
        answer = {"error": {"type": type(exc).__name__, "message": str(exc)}}
    sys.stdout.write(json.dumps(answer, default=str) + "\n")
    sys.stdout.flush()
"""


class FalWorker:
    """Drives the unmodified fal_client in a subprocess configured with ``emu.env()``."""

    def __init__(self, env: dict[str, str]) -> None:
        full_env = {**os.environ, **env}
        full_env.pop("FAL_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            env=full_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "fal_client worker died"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ok(self, op: str, **kwargs: Any) -> Any:
        answer = self.call(op, **kwargs)
        assert "ok" in answer, answer
        return answer["ok"]

    def error(self, op: str, **kwargs: Any) -> dict[str, Any]:
        answer = self.call(op, **kwargs)
        assert "error" in answer, answer
        err: dict[str, Any] = answer["error"]
        return err

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[FalEmulator]:
    with FalEmulator(latency=LATENCY, concurrency_limit=16, seed=1) as emu:
        yield emu


@pytest.fixture
def emu(server: FalEmulator) -> FalEmulator:
    server.reset()
    server.configure(latency=LATENCY, concurrency_limit=16)
    return server


@pytest.fixture(scope="module")
def tls(server: FalEmulator) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=server.ca_bundle)


@pytest.fixture(scope="module")
def http(server: FalEmulator, tls: ssl.SSLContext) -> Iterator[httpx.Client]:
    headers = {"Authorization": "Key test-key"}
    with httpx.Client(base_url=server.base_url, verify=tls, headers=headers, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def fal(server: FalEmulator) -> Iterator[FalWorker]:
    worker = FalWorker(server.env())
    assert worker.ok("config")["queue_url"] == f"https://{server.host}/"
    yield worker
    worker.close()


def submit(http: httpx.Client, prompt: str = "a red fox", endpoint: str = T2I, **args: Any) -> str:
    r = http.post(f"/{endpoint}", json={"prompt": prompt, "quality": "low", **args})
    assert r.status_code == 200, r.text
    rid: str = r.json()["request_id"]
    return rid


def req_url(rid: str, suffix: str = "") -> str:
    return f"/{T2I}/requests/{rid}{suffix}"


def wait_completed(emu: FalEmulator, rid: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (info := emu.request(rid)) is None or info.status != "COMPLETED":
        assert time.monotonic() < deadline, f"{rid} not completed"
        time.sleep(0.01)


def png_data_uri(size: tuple[int, int] = (64, 48)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# -- packaging --------------------------------------------------------------------------------


def test_import_is_light_and_never_imports_fal_client() -> None:
    code = (
        "import sys, prefect_gptimage.testing, prefect_gptimage.testing.emulator\n"
        "bad = [m for m in ('fal_client', 'prefect') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_addresses_env_and_ca_bundle(server: FalEmulator) -> None:
    port = server.port
    assert server.host == f"localhost:{port}"
    assert server.base_url == f"https://localhost:{port}"
    assert server.env() == {
        "FAL_QUEUE_RUN_HOST": f"localhost:{port}",
        "FAL_RUN_HOST": f"localhost:{port}",
        "SSL_CERT_FILE": server.ca_bundle,
        "REQUESTS_CA_BUNDLE": server.ca_bundle,
        "PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS": "localhost,127.0.0.1",
        "PREFECT_GPTIMAGE_FAL_API_URL": f"https://localhost:{port}",  # pricing, billing events
    }
    bundle = Path(server.ca_bundle).read_text()
    assert bundle.count("BEGIN CERTIFICATE") > 50  # public CAs kept, so other HTTPS verifies
    ctx = ssl.create_default_context(cafile=server.ca_bundle)
    for host in ("localhost", "127.0.0.1"):
        r = httpx.get(f"https://{host}:{port}/_emulator/config", verify=ctx)
        assert r.status_code == 200
    public_only = ssl.create_default_context(cafile=certifi.where())
    with pytest.raises(httpx.ConnectError):  # public CAs alone do not trust the emulator
        httpx.get(f"{server.base_url}/_emulator/config", verify=public_only)


def test_not_started_emulator_has_no_address() -> None:
    with pytest.raises(RuntimeError):
        _ = FalEmulator().host


# -- round trips with the unmodified fal_client ----------------------------------------------


def test_text_to_image_round_trip_with_fal_client(
    emu: FalEmulator, fal: FalWorker, tls: ssl.SSLContext
) -> None:
    args = {
        "prompt": "a lighthouse at dawn",
        "quality": "low",
        "image_size": "1536x1024",
        "output_format": "webp",
        "num_images": 2,
    }
    out = fal.ok("subscribe", app=T2I, args=args)
    events = out["events"]
    assert events[-1]["type"] == "Completed"
    assert events[-1]["metrics"]["inference_time"] == pytest.approx(LATENCY, abs=0.02)
    assert any(e["type"] == "InProgress" and e["logs"] for e in events)
    images = out["result"]["images"]
    assert len(images) == 2
    contents = []
    for image in images:
        assert image["content_type"] == "image/webp"
        assert image["file_name"].endswith(".webp")
        assert (image["width"], image["height"]) == (1536, 1024)
        r = httpx.get(image["url"], verify=tls)  # media needs no key
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/webp"
        assert int(r.headers["content-length"]) == image["file_size"] == len(r.content)
        with Image.open(io.BytesIO(r.content)) as img:
            assert img.format == "WEBP" and img.size == (1536, 1024)
        contents.append(r.content)
    assert contents[0] != contents[1]  # images visibly differ
    stats = emu.stats
    assert (stats.accepted, stats.completed, stats.media) == (1, 1, 2)
    assert stats.submits_by_endpoint == {T2I: 1}


def test_edit_round_trip_with_fal_client(
    emu: FalEmulator, fal: FalWorker, http: httpx.Client, tls: ssl.SSLContext
) -> None:
    first = submit(http, "source image")
    wait_completed(emu, first)
    own_url = http.get(req_url(first)).json()["images"][0]["url"]
    args = {
        "prompt": "make it night",
        "image_urls": [own_url, png_data_uri()],
        "background": "transparent",
        "quality": "low",
    }
    out = fal.ok("run_handle", app=EDIT, args=args)
    # status/result/cancel URLs drop the /edit sub-path (fal-protocol §1.2)
    assert out["status_url"] == f"{emu.base_url}/{T2I}/requests/{out['request_id']}/status"
    assert out["status"]["type"] == "Completed" and out["status"]["error"] is None
    image = out["result"]["images"][0]
    assert (image["width"], image["height"]) == (1024, 1024)  # edit "auto"
    with Image.open(io.BytesIO(httpx.get(image["url"], verify=tls).content)) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGBA", (1024, 1024))
    # fal_client.result(app, id) builds owner/app URLs itself: the same result comes back
    assert fal.ok("result", app=EDIT, request_id=out["request_id"]) == out["result"]
    assert emu.stats.submits_by_endpoint == {T2I: 1, EDIT: 1}


def test_sync_mode_returns_data_uris(emu: FalEmulator, fal: FalWorker) -> None:
    args = {"prompt": "a blue bird", "quality": "low", "output_format": "jpeg", "sync_mode": True}
    image = fal.ok("subscribe", app=T2I, args=args)["result"]["images"][0]
    head, _, data = image["url"].partition(",")
    assert head == "data:image/jpeg;base64"
    raw = base64.b64decode(data)
    assert len(raw) == image["file_size"]
    with Image.open(io.BytesIO(raw)) as img:
        assert (img.format, img.size) == ("JPEG", (1024, 1024))
    assert emu.stats.media == 0


class _FileServer(BaseHTTPRequestHandler):
    """Plain-http file host standing in for a presigned S3 URL."""

    files: dict[str, bytes] = {}

    def do_GET(self) -> None:
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def file_host() -> Iterator[str]:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    _FileServer.files = {"/ok.png?X-Amz-Signature=abc": buf.getvalue(), "/text.png": b"hello"}
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FileServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize(
    ("path", "error_type"),
    [
        ("/ok.png?X-Amz-Signature=abc", None),
        ("/missing.png", "file_download_error"),
        ("/text.png", "image_load_error"),
    ],
)
def test_edit_fetches_input_images(
    emu: FalEmulator,
    http: httpx.Client,
    fal: FalWorker,
    file_host: str,
    path: str,
    error_type: str | None,
) -> None:
    rid = submit(http, "edit me", EDIT, image_urls=[file_host + path])
    wait_completed(emu, rid)
    status = http.get(req_url(rid, "/status")).json()
    assert status["status"] == "COMPLETED"
    assert status.get("error_type") == error_type
    if error_type is None:
        assert http.get(req_url(rid)).status_code == 200
        return
    r = http.get(req_url(rid))
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "image_urls"]
    assert r.json()["detail"][0]["type"] == error_type
    err = fal.error("result", app=EDIT, request_id=rid)
    assert (err["type"], err["status_code"]) == ("FalClientHTTPError", 422)
    assert emu.stats.failed == 1


def test_edit_with_unreachable_or_bad_inputs_fails(emu: FalEmulator, http: httpx.Client) -> None:
    bad = [
        f"{emu.base_url}/files/00000000-0000-0000-0000-000000000000/0.png",
        "http://127.0.0.1:1/closed-port.png",
        "data:image/png;base64,bm90IGFuIGltYWdl",
        "https://127.0.0.1:1/closed-port.png",  # (an ftp:// URL is refused at submit now)
    ]
    rids = [submit(http, "edit me", EDIT, image_urls=[url]) for url in bad]
    for rid in rids:
        wait_completed(emu, rid)
        info = emu.request(rid)
        assert info is not None and info.status_code == 422, info
    assert emu.stats.failed == len(bad)


# -- validation, auth, routing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body", "field"),
    [
        (T2I, {"prompt": "x"}, "prompt"),
        (T2I, {}, "prompt"),
        (T2I, {"prompt": "ok prompt", "num_images": 9}, "num_images"),
        (T2I, {"prompt": "ok prompt", "image_size": "auto"}, "image_size"),
        (T2I, {"prompt": "ok prompt", "qualty": "low"}, "qualty"),
        (EDIT, {"prompt": "ok prompt"}, "image_urls"),
    ],
)
def test_invalid_input_is_422(
    emu: FalEmulator, http: httpx.Client, endpoint: str, body: dict[str, Any], field: str
) -> None:
    r = http.post(f"/{endpoint}", json=body)
    assert r.status_code == 422
    assert "x-fal-request-id" in r.headers
    detail = r.json()["detail"]
    assert detail[0]["loc"] == ["body", field]
    assert detail[0]["msg"] and detail[0]["type"]
    assert emu.stats.accepted == 0


def test_invalid_input_surfaces_in_fal_client(emu: FalEmulator, fal: FalWorker) -> None:
    err = fal.error("submit", app=T2I, args={"prompt": "ok", "num_images": 0})
    assert (err["type"], err["status_code"]) == ("FalClientHTTPError", 422)
    assert err["message"][0]["loc"] == ["body", "num_images"]
    assert emu.stats.submit == 1  # 422 is not retried


def test_missing_key_is_401(emu: FalEmulator, tls: ssl.SSLContext, http: httpx.Client) -> None:
    rid = submit(http)
    with httpx.Client(base_url=emu.base_url, verify=tls) as anon:
        for method, url in [
            ("POST", f"/{T2I}"),
            ("GET", req_url(rid, "/status")),
            ("GET", req_url(rid)),
            ("PUT", req_url(rid, "/cancel")),
        ]:
            r = anon.request(
                method, url, json={"prompt": "a red fox"} if method == "POST" else None
            )
            assert r.status_code == 401
            assert r.json()["detail"] == "No API key provided"
            assert "x-fal-request-id" in r.headers
        r = anon.post(f"/{T2I}", headers={"Authorization": "Bearer xyz"}, json={"prompt": "hi"})
        assert r.status_code == 401
        wait_completed(emu, rid)
        url = http.get(req_url(rid)).json()["images"][0]["url"]
        assert anon.get(url).status_code == 200  # CDN media is public
    stats = emu.stats
    assert (stats.unauthorized, stats.accepted) == (5, 1)


def test_key_not_required_when_disabled(tls: ssl.SSLContext) -> None:
    with FalEmulator(latency=0.01, require_key=False) as other:
        r = httpx.post(f"{other.base_url}/{T2I}", json={"prompt": "hi there"}, verify=tls)
        assert r.status_code == 200


def test_unknown_routes_and_ids_are_404(http: httpx.Client) -> None:
    r = http.post("/fal-ai/flux/dev", json={"prompt": "hi there"})
    assert r.status_code == 404 and "x-fal-request-id" in r.headers
    assert http.post(f"/{T2I}/other", json={"prompt": "hi there"}).status_code == 404
    r = http.get(req_url("nope", "/status"))
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert http.get(req_url("nope")).status_code == 404
    r = http.put(req_url("nope", "/cancel"))
    assert (r.status_code, r.json()) == (404, {"status": "NOT_FOUND"})
    assert http.get("/files/nope/0.png").status_code == 404


def test_restart_keeps_port_and_chunked_bodies_work(tls: ssl.SSLContext) -> None:
    other = FalEmulator(latency=0.01, require_key=False).start()
    port = other.port
    other.stop()
    other.start()
    try:
        assert other.port == port
        chunks = iter([b'{"prompt": ', b'"chunked body"}'])
        r = httpx.post(f"{other.base_url}/{T2I}", content=chunks, verify=tls)
        assert r.status_code == 200, r.text
    finally:
        other.stop()


# -- queue semantics ---------------------------------------------------------------------------


def test_queue_positions_with_concurrency_limit_1(
    emu: FalEmulator, http: httpx.Client, fal: FalWorker
) -> None:
    emu.configure(latency=0.4, concurrency_limit=1)
    answers = [http.post(f"/{T2I}", json={"prompt": f"row {i}"}) for i in range(3)]
    bodies = [a.json() for a in answers]
    rids = [b["request_id"] for b in bodies]
    assert [b["status"] for b in bodies] == ["IN_QUEUE"] * 3
    assert [b["queue_position"] for b in bodies] == [0, 0, 1]
    assert all(a.headers["x-fal-request-id"] == r for a, r in zip(answers, rids, strict=True))
    s = [http.get(req_url(r, "/status")) for r in rids]
    assert [x.status_code for x in s] == [202, 202, 202]
    assert [x.json()["status"] for x in s] == ["IN_PROGRESS", "IN_QUEUE", "IN_QUEUE"]
    assert [x.json().get("queue_position") for x in s] == [None, 0, 1]
    assert s[0].json()["logs"] is None
    assert fal.ok("status", app=T2I, request_id=rids[2]) == {"type": "Queued", "position": 1}
    assert emu.wait_idle(5)
    infos = [emu.request(r) for r in rids]
    assert all(i is not None and i.succeeded for i in infos)
    # FIFO, exactly back to back: each starts when the previous one ends
    assert infos[1].started_at == pytest.approx(infos[0].completed_at, abs=1e-6)  # type: ignore[union-attr]
    assert infos[2].started_at == pytest.approx(infos[1].completed_at, abs=1e-6)  # type: ignore[union-attr]
    assert emu.stats.max_in_progress == 1


def test_max_in_progress_never_exceeds_limit(emu: FalEmulator, tls: ssl.SSLContext) -> None:
    emu.configure(latency=0.05, concurrency_limit=3)

    def one(i: int) -> None:
        with httpx.Client(verify=tls, headers={"Authorization": "Key k"}) as c:
            r = c.post(f"{emu.base_url}/{T2I}", json={"prompt": f"concurrent {i}"})
            assert r.status_code == 200

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert emu.wait_idle(10)
    stats = emu.stats
    assert (stats.accepted, stats.completed, stats.max_in_progress) == (24, 24, 3)
    events = []
    for info in emu.requests():
        assert info.started_at is not None and info.completed_at is not None
        events += [(info.started_at, 1), (info.completed_at, -1)]
    running = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        running += delta
        peak = max(peak, running)
    assert peak == 3


def test_result_before_completion_is_202_with_status(emu: FalEmulator, http: httpx.Client) -> None:
    emu.set_latency(0.3)
    rid = submit(http)
    r = http.get(req_url(rid))
    assert r.status_code == 202 and r.json()["status"] == "IN_PROGRESS"
    wait_completed(emu, rid)
    r = http.get(req_url(rid, "/status"), params={"logs": "1"})
    assert r.status_code == 200
    body = r.json()
    assert body["metrics"]["inference_time"] == pytest.approx(0.3, abs=0.01)
    assert [line["message"] for line in body["logs"]][-2:] == [
        "Generating image 1/1",
        "Generated 1 image(s)",
    ]
    assert set(body["logs"][0]) == {"message", "level", "source", "timestamp"}


def test_set_latency_and_concurrency_at_runtime(emu: FalEmulator, http: httpx.Client) -> None:
    emu.configure(latency=5.0, concurrency_limit=1)
    slow, waiting = submit(http, "slow one"), submit(http, "waiting one")
    emu.set_latency(0.05)
    emu.set_concurrency_limit(2)  # frees a slot: the queued request starts now, with 0.05 s
    wait_completed(emu, waiting)
    info = emu.request(slow)
    assert info is not None and info.status == "IN_PROGRESS"
    http.put(req_url(slow, "/cancel"))


def test_cancel_queued_running_completed_unknown(
    emu: FalEmulator, http: httpx.Client, fal: FalWorker
) -> None:
    emu.configure(latency=0.5, concurrency_limit=1)
    running, queued = submit(http, "first"), submit(http, "second")
    r = http.put(req_url(queued, "/cancel"))
    assert (r.status_code, r.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    status = http.get(req_url(queued, "/status")).json()
    assert (status["status"], status["error_type"]) == ("COMPLETED", "client_cancelled")
    assert status["error"] == "Request cancelled"
    assert http.get(req_url(queued)).status_code == 499
    info = emu.request(queued)
    assert info is not None and info.started_at is None  # never ran

    assert http.put(req_url(running, "/cancel")).status_code == 202
    assert http.get(req_url(running, "/status")).json()["error_type"] == "client_cancelled"

    emu.set_latency(0.05)
    done = submit(http, "third")
    wait_completed(emu, done)
    r = http.put(req_url(done, "/cancel"))
    assert (r.status_code, r.json()) == (400, {"status": "ALREADY_COMPLETED"})
    err = fal.error("cancel", app=T2I, request_id=done)
    assert err["status_code"] == 400
    err = fal.error("cancel", app=T2I, request_id="unknown-id")
    assert err["status_code"] == 404
    stats = emu.stats
    assert (stats.cancelled, stats.completed, stats.accepted) == (2, 1, 3)


def test_start_timeout_expires_in_queue(emu: FalEmulator, http: httpx.Client) -> None:
    emu.configure(latency=0.5, concurrency_limit=1)
    submit(http, "blocker")
    r = http.post(f"/{T2I}", json={"prompt": "impatient"}, headers={"X-Fal-Request-Timeout": "0.1"})
    rid = r.json()["request_id"]
    wait_completed(emu, rid)
    status = http.get(req_url(rid, "/status")).json()
    assert status["error_type"] == "request_timeout"
    r = http.get(req_url(rid))
    assert r.status_code == 504
    assert r.headers["x-fal-request-timeout-type"] == "user"
    assert r.json()["error_type"] == "request_timeout"
    info = emu.request(rid)
    assert info is not None and info.started_at is None
    bad = http.post(f"/{T2I}", json={"prompt": "hi there"}, headers={"X-Fal-Request-Timeout": "x"})
    assert bad.status_code == 400


def test_status_stream_events(emu: FalEmulator, http: httpx.Client) -> None:
    emu.configure(latency=0.25, concurrency_limit=1)
    rids = [submit(http, f"stream {i}") for i in range(3)]
    events = []
    with http.stream("GET", req_url(rids[2], "/status/stream"), params={"logs": "1"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["x-fal-request-id"] == rids[2]
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    states = [(e["status"], e.get("queue_position")) for e in events]
    assert states[0] == ("IN_QUEUE", 1)
    assert ("IN_QUEUE", 0) in states
    assert states[-1] == ("COMPLETED", None)
    in_progress = [e for e in events if e["status"] == "IN_PROGRESS"]
    assert in_progress and in_progress[0]["logs"]
    assert events[-1]["metrics"]["inference_time"] == pytest.approx(0.25, abs=0.01)
    assert emu.stats.status_stream == 1


# -- faults ------------------------------------------------------------------------------------

JSON_ERROR_TYPES = {
    "500_json": (500, "runner_server_error"),
    "502_json": (502, "runner_incomplete_response"),
    "503_json": (503, "runner_scheduling_failure"),
    "504_json": (504, "request_timeout"),
}


@pytest.mark.parametrize("kind", ["429", *JSON_ERROR_TYPES])
def test_json_error_faults_on_submit(emu: FalEmulator, http: httpx.Client, kind: str) -> None:
    emu.inject(Fault("submit", kind))  # type: ignore[arg-type]
    r = http.post(f"/{T2I}", json={"prompt": "hi there"})
    code, etype = JSON_ERROR_TYPES.get(kind, (429, "rate_limited"))
    assert r.status_code == code
    assert r.json()["error_type"] == etype and isinstance(r.json()["detail"], str)
    assert r.headers["x-fal-error-type"] == etype
    assert "x-fal-request-id" in r.headers
    assert emu.stats.accepted == 0
    assert http.post(f"/{T2I}", json={"prompt": "hi there"}).status_code == 200  # count=1
    assert emu.stats.faults_fired == 1


@pytest.mark.parametrize("code", [500, 502, 503, 504])
def test_ingress_faults_look_like_nginx(emu: FalEmulator, http: httpx.Client, code: int) -> None:
    rid = submit(http)
    emu.inject(Fault("status", f"{code}_ingress"))  # type: ignore[arg-type]
    r = http.get(req_url(rid, "/status"))
    assert r.status_code == code
    assert r.headers["content-type"] == "text/html"
    assert "x-fal-request-id" not in r.headers
    assert "<center>nginx</center>" in r.text
    assert http.get(req_url(rid, "/status")).status_code in (200, 202)


def test_drop_before_and_after_accept(emu: FalEmulator, http: httpx.Client) -> None:
    emu.inject(Fault("submit", "drop"))
    with pytest.raises(httpx.RemoteProtocolError):
        http.post(f"/{T2I}", json={"prompt": "hi there"})
    assert emu.stats.accepted == 0
    emu.inject(Fault("submit", "drop_after_accept"))
    with pytest.raises(httpx.RemoteProtocolError):
        http.post(f"/{T2I}", json={"prompt": "hi there"})
    assert emu.wait_idle(5)
    stats = emu.stats
    assert (stats.accepted, stats.completed, stats.faults_fired) == (1, 1, 2)
    rid = submit(http)
    emu.inject(Fault("result", "drop"))
    wait_completed(emu, rid)
    with pytest.raises(httpx.RemoteProtocolError):
        http.get(req_url(rid))
    assert http.get(req_url(rid)).status_code == 200  # the connection pool recovers


def test_error_after_accept_names_the_accepted_request(
    emu: FalEmulator, http: httpx.Client
) -> None:
    emu.inject(Fault("submit", "error_after_accept"))
    r = http.post(f"/{T2I}", json={"prompt": "hi there"})
    assert r.status_code == 503
    assert r.json()["error_type"] == "runner_scheduling_failure"
    [info] = emu.requests()
    assert r.headers["x-fal-request-id"] == info.request_id
    assert emu.stats.accepted == 1


@pytest.mark.parametrize(
    ("kind", "form", "lands_on"),
    [
        ("id_slash", "{own}/x", None),
        ("id_dotdot", "{own}/../{other}", "other"),
        ("id_absolute", "/tmp/{own}", None),
        ("id_other", "{other}", "other"),
    ],
)
def test_forged_request_ids(
    emu: FalEmulator, http: httpx.Client, kind: str, form: str, lands_on: str | None
) -> None:
    """Issue 18: a submit accepted, then answered with an id that is not its own."""
    other = http.post(f"/{T2I}", json={"prompt": "the first one"}).json()["request_id"]
    emu.inject(Fault.parse(f"submit:{kind}:1"))
    r = http.post(f"/{T2I}", json={"prompt": "the second one"})
    assert r.status_code == 200 and emu.stats.accepted == 2  # it is paid for
    own = emu.requests()[1].request_id
    forged = r.json()["request_id"]
    assert forged == form.format(own=own, other=other) != own
    assert r.headers["x-fal-request-id"] == forged
    assert r.json()["status_url"].endswith(f"/requests/{forged}/status")
    # a client that follows the answer (httpx resolves the dots) never reaches its own request:
    # another request's record, or a path the emulator counts as stray
    strays = emu.stray_calls
    answer = http.get(r.json()["status_url"])
    if lands_on == "other":
        assert answer.json()["request_id"] == other
    else:
        assert answer.status_code in (404, 405) and emu.stray_calls == strays + 1


def test_fail_fault_500_and_422(emu: FalEmulator, http: httpx.Client, fal: FalWorker) -> None:
    emu.inject(Fault("submit", "fail", match="row-7"))
    emu.inject(Fault("submit", "fail", status_code=422, match="row-8"))
    ok, f500, f422 = (submit(http, f"row-{i} of the sheet") for i in (6, 7, 8))
    for rid in (ok, f500, f422):
        wait_completed(emu, rid)
    s = http.get(req_url(f500, "/status"))
    assert s.status_code == 200
    assert (s.json()["status"], s.json()["error_type"]) == ("COMPLETED", "runner_server_error")
    r = http.get(req_url(f500))
    assert r.status_code == 500 and r.json()["error_type"] == "runner_server_error"
    r = http.get(req_url(f422))
    assert r.status_code == 422
    assert r.headers["x-fal-retryable"] == "false"
    assert r.json()["detail"][0]["type"] == "content_policy_violation"
    assert http.get(req_url(ok)).status_code == 200
    err = fal.error("result", app=T2I, request_id=f500)
    assert (err["status_code"], err["error_type"]) == (500, "runner_server_error")
    stats = emu.stats
    assert (stats.accepted, stats.completed, stats.failed) == (3, 1, 2)


def test_media_faults(emu: FalEmulator, http: httpx.Client, tls: ssl.SSLContext) -> None:
    rid = submit(http, output_format="png")
    wait_completed(emu, rid)
    url = http.get(req_url(rid)).json()["images"][0]["url"]
    emu.inject(Fault("media", "404"))
    emu.inject(Fault("media", "wrong_format"))
    emu.inject(Fault("media", "truncate"))
    with httpx.Client(verify=tls) as media:
        r = media.get(url)
        assert r.status_code == 404 and "x-fal-request-id" not in r.headers
        r = media.get(url)
        assert r.headers["content-type"] == "image/png" and sniff_format(r.content) == "jpeg"
        with pytest.raises(httpx.RemoteProtocolError):
            media.get(url)
        r = media.get(url)
        assert r.status_code == 200 and sniff_format(r.content) == "png"
        assert media.head(url).headers["content-length"] == str(len(r.content))
    assert emu.stats.faults_by_kind == {"404": 1, "wrong_format": 1, "truncate": 1}


def test_slow_fault_delays_the_answer(emu: FalEmulator, http: httpx.Client) -> None:
    rid = submit(http)
    emu.inject(Fault("status", "slow", delay=0.3))
    t0 = time.monotonic()
    assert http.get(req_url(rid, "/status")).status_code in (200, 202)
    assert time.monotonic() - t0 >= 0.3
    emu.inject(Fault("submit", "slow", delay=0.2))
    t0 = time.monotonic()
    submit(http)
    assert time.monotonic() - t0 >= 0.2


def test_fault_filters_count_and_probability(emu: FalEmulator, http: httpx.Client) -> None:
    emu.inject(Fault("submit", "429", count=None, endpoint=EDIT))
    emu.inject(Fault("any", "503_json", count=2, match="unlucky"))
    assert http.post(f"/{EDIT}", json={"prompt": "hi", "image_urls": ["x"]}).status_code == 429
    assert http.post(f"/{T2I}", json={"prompt": "hi there"}).status_code == 200
    codes = [http.post(f"/{T2I}", json={"prompt": "unlucky me"}).status_code for _ in range(3)]
    assert codes == [503, 503, 200]

    def rolls(seed: int) -> list[bool]:
        book = FaultBook(seed)
        book.add(Fault("status", "429", count=None, probability=0.5))
        return [book.pick("status", {"429"}) is not None for _ in range(40)]

    assert rolls(7) == rolls(7)  # seeded: reproducible
    assert 5 < sum(rolls(7)) < 35


def test_fault_parsing_and_validation() -> None:
    f = Fault.parse("status:503_json:3")
    assert (f.operation, f.kind, f.count) == ("status", "503_json", 3)
    assert Fault.parse("media:slow:*:2.5").delay == pytest.approx(2.5)
    assert Fault.parse("media:slow:*").count is None
    assert Fault.parse("submit:fail:1:422").http_status == 422
    assert Fault("submit", "slow").delay == pytest.approx(1.0)
    for bad in (
        "status",
        "status:teapot",
        "nowhere:429",
        "status:fail",
        "submit:truncate",
        "status:id_dotdot",
    ):
        with pytest.raises(ValueError):
            Fault.parse(bad)
    with pytest.raises(ValueError):
        Fault.from_dict({"operation": "submit", "kind": "429", "colour": "red"})
    assert Fault.from_dict(f.to_dict()).to_dict() == {**f.to_dict(), "fired": 0}


def test_fal_client_retries_hide_429_and_ingress_but_not_json_503(
    emu: FalEmulator, fal: FalWorker
) -> None:
    args = {"prompt": "a patient client", "quality": "low"}
    emu.inject(Fault("submit", "429", count=2))
    emu.inject(Fault("status", "503_ingress", count=2))
    emu.inject(Fault("result", "502_ingress", count=1))
    out = fal.ok("run_handle", app=T2I, args=args)
    assert out["result"]["images"]
    stats = emu.stats
    assert (stats.submit, stats.accepted, stats.faults_fired) == (3, 1, 5)

    emu.inject(Fault("status", "503_json"))
    err = fal.error("run_handle", app=T2I, args=args)
    assert (err["type"], err["status_code"]) == ("FalClientHTTPError", 503)
    assert err["error_type"] == "runner_scheduling_failure"
    assert "x-fal-request-id" in err["headers"]


def test_duplicate_submits_counted(emu: FalEmulator, http: httpx.Client, fal: FalWorker) -> None:
    # fal_client retries a submit whose connection dropped after acceptance: a duplicate
    emu.inject(Fault("submit", "drop_after_accept"))
    fal.ok("run_handle", app=T2I, args={"prompt": "retried", "quality": "low"})
    assert (emu.stats.accepted, emu.stats.duplicate_submits) == (2, 1)
    # explicit defaults normalize to the same input; another endpoint is another input
    submit(http, "same", quality="low")
    submit(http, "same", quality="low", image_size="1024x1024", num_images=1)
    submit(http, "same", EDIT, image_urls=[png_data_uri()])
    stats = emu.stats
    assert stats.duplicate_submits == 2
    assert sorted(stats.submits_by_input.values()) == [1, 2, 2]
    key = next(k for k, v in stats.submits_by_input.items() if '"same"' in k and v == 2)
    assert json.loads(key)["endpoint"] == T2I


# -- admin API, reset, CLI ---------------------------------------------------------------------


def test_admin_api(emu: FalEmulator, http: httpx.Client, tls: ssl.SSLContext) -> None:
    admin = httpx.Client(base_url=f"{emu.base_url}/_emulator", verify=tls)  # no key needed
    r = admin.post("/faults", json={"operation": "submit", "kind": "429", "count": 1})
    assert r.status_code == 201 and r.json()["kind"] == "429"
    assert admin.post("/faults", json={"spec": "status:503_json:2"}).status_code == 201
    assert admin.post("/faults", json={"operation": "submit", "kind": "nope"}).status_code == 400
    assert [f["kind"] for f in admin.get("/faults").json()] == ["429", "503_json"]
    assert [f.kind for f in emu.faults] == ["429", "503_json"]
    assert http.post(f"/{T2I}", json={"prompt": "hi there"}).status_code == 429
    assert admin.get("/stats").json()["faults_fired"] == 1
    assert admin.delete("/faults").json() == {"cleared": 2}
    r = admin.post("/config", json={"latency": 0.05, "concurrency_limit": 3})
    assert r.json()["latency"] == pytest.approx(0.05) and r.json()["concurrency_limit"] == 3
    assert (emu.latency, emu.concurrency_limit) == (pytest.approx(0.05), 3)
    assert admin.post("/config", json={"concurrency_limit": 0}).status_code == 400
    rid = submit(http)
    assert admin.get(f"/requests/{rid}").json()["endpoint"] == T2I
    stats = admin.get("/stats").json()
    assert (stats["submit"], stats["accepted"], stats["faults_fired"]) == (2, 1, 1)
    assert admin.post("/reset").status_code == 200
    assert emu.stats.submit == 0 and emu.request(rid) is None and emu.faults == []
    assert admin.get(f"/requests/{rid}").status_code == 404
    admin.close()


def test_cli_serves_until_sigterm(tls: ssl.SSLContext) -> None:
    code = (
        "import sys; from prefect_gptimage.testing.emulator import serve_forever_cli;"
        "sys.exit(serve_forever_cli(sys.argv[1:]))"
    )
    cmd = [sys.executable, "-c", code, "--latency", "0.05", "--fault", "status:503_json:3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        exports = {}
        for line in proc.stdout:
            if line.startswith("export "):
                name, _, value = line[7:].strip().partition("=")
                exports[name] = value
            if "stop" in line:
                break
        assert set(exports) >= {"FAL_QUEUE_RUN_HOST", "FAL_RUN_HOST", "SSL_CERT_FILE"}
        ctx = ssl.create_default_context(cafile=exports["SSL_CERT_FILE"])
        base = f"https://{exports['FAL_QUEUE_RUN_HOST']}"
        faults = httpx.get(f"{base}/_emulator/faults", verify=ctx).json()
        assert [(f["operation"], f["kind"], f["count"]) for f in faults] == [
            ("status", "503_json", 3)
        ]
        config = httpx.get(f"{base}/_emulator/config", verify=ctx).json()
        assert config["latency"] == pytest.approx(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_many_concurrent_pollers(emu: FalEmulator, tls: ssl.SSLContext) -> None:
    """200 clients submit at once and poll until done: no errors, every request completes, and
    the account limit holds. The limit is 1 while they submit and 16 once all 200 are queued,
    so the peak is 16 however slowly a loaded machine submits (not only when 16 submits land
    within one latency)."""
    emu.configure(latency=0.5, concurrency_limit=1)
    errors: list[str] = []
    n = 200
    barrier = threading.Barrier(n)
    headers = {"Authorization": "Key k"}
    # connected one after the other before the barrier: 200 TLS handshakes at once would be a
    # test of the machine's speed (the server gives each 10 s)
    clients = [httpx.Client(verify=tls, headers=headers, timeout=120) for _ in range(n)]
    for c in clients:
        assert c.get(f"{emu.base_url}/_emulator/config").status_code == 200

    def client(i: int) -> None:
        c = clients[i]
        try:
            barrier.wait()
            sub = c.post(f"{emu.base_url}/{T2I}", json={"prompt": f"load {i}"}).json()
            while c.get(sub["status_url"]).status_code == 202:
                time.sleep(0.05)
            assert c.get(sub["response_url"]).status_code == 200
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 300
        while emu.stats.accepted < n:
            assert time.monotonic() < deadline and not errors, (emu.stats.accepted, errors[:3])
            time.sleep(0.05)
        emu.set_concurrency_limit(16)  # the queue is full: 15 more start at once
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic()))
    finally:
        for c in clients:
            c.close()
    assert not any(t.is_alive() for t in threads), "pollers still running after 300 s"
    assert errors == []
    stats = emu.stats
    assert (stats.completed, stats.max_in_progress) == (n, 16)


# -- images ------------------------------------------------------------------------------------


def test_image_factory_formats_and_cache() -> None:
    factory = ImageFactory()
    a = factory.render(1024, 1536, "png", transparent=True, variant=variant_for("a", 0))
    assert factory.render(1024, 1536, "png", transparent=True, variant=variant_for("a", 0)) is a
    with Image.open(io.BytesIO(a)) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGBA", (1024, 1536))
    jpeg = factory.render(1024, 1024, "jpeg", transparent=True, variant=1)
    with Image.open(io.BytesIO(jpeg)) as img:
        assert (img.format, img.mode) == ("JPEG", "RGB")
    variants = {factory.render(1024, 1024, "png", transparent=False, variant=v) for v in range(8)}
    assert len(variants) == 8
