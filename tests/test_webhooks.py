"""Waiting without polling (issue 20): fal's signed callbacks, the receiver, the sweep.

The emulator delivers signed callbacks over real HTTP to the receiver, run as a user runs it
(``prefect-gptimage webhooks serve`` in its own process), which fetches the emulator's JWKS over
HTTPS and records callbacks in the session's result storage; batches run on the real Prefect
API of the session with ``PREFECT_GPTIMAGE_WEBHOOK_URL`` pointing at the receiver. Faults are
the emulator's (forged, replayed, duplicated, dropped callbacks) or a receiver killed with
SIGKILL.
"""

from __future__ import annotations

import contextvars
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from real_services import free_port

from prefect_gptimage.errors import BatchIncomplete
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server
from prefect_gptimage.testing.webhooks import JWKS_PATH, WebhookFault, sign
from prefect_gptimage.webhooks import JwksKeys, SignatureRejected, Verifier

RID = "80e732af-660e-45cd-bd63-580e4f2a94cc"
#: Seconds a receiver process may take to answer /health (it imports Prefect: slow under load).
START_S = 180.0
#: Seconds a batch may take (generous: a loaded machine).
RUN_S = 600.0


class Receiver:
    """``prefect-gptimage webhooks serve`` in its own process, on a fixed port."""

    def __init__(self, port: int, env: dict[str, str], log: Path) -> None:
        self.port, self.env, self.log = port, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fal/webhook"

    def start(self) -> Receiver:
        args = ["webhooks", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect_gptimage.cli", *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"receiver did not start:\n{self.log.read_text()}")

    def stats(self) -> dict[str, int]:
        return dict(httpx.get(f"http://127.0.0.1:{self.port}/stats").json())

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture
def receiver(
    fal_emulator: FalEmulator, prefect_harness: dict[str, Any], tmp_path: Path
) -> Iterator[Receiver]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PREFECT_API_URL": str(prefect_harness["api_url"]),
            "PREFECT_LOCAL_STORAGE_PATH": str(prefect_harness["storage"]),
            "PREFECT_GPTIMAGE_FAL_JWKS_URL": fal_emulator.base_url + JWKS_PATH,
        }
    )
    rec = Receiver(free_port(), env, tmp_path / "receiver.log").start()
    yield rec
    rec.kill()


@pytest.fixture
def webhooks_on(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, fal_emulator: FalEmulator
) -> Iterator[Receiver]:
    monkeypatch.setenv("PREFECT_GPTIMAGE_WEBHOOK_URL", receiver.url)
    fal_emulator.webhooks.retry_delays = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
    yield receiver
    fal_emulator.webhooks.clear_faults()


@dataclass(frozen=True)
class Batch:
    """One test's batch: its prompt file, bucket and output folder."""

    s3: LocalS3Server
    bucket: str
    unique: str
    folder: Path

    def run(self, rows: int) -> RunSummary:
        """``batch_to_s3`` over ``rows`` new prompts, all at once (concurrency ``rows``)."""
        from prefect_gptimage.flows.batch import batch_to_s3

        path = self.folder / "p.jsonl"
        lines = [
            {"prompt": f"a lighthouse {i} {self.unique}", "quality": "low"} for i in range(rows)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        state = batch_to_s3(
            return_state=True,
            prompt_file=str(path),
            bucket=self.bucket,
            output_dir=str(self.folder / "out"),
            concurrency=rows,
        )
        summary = state.result(raise_on_failure=False)
        if isinstance(summary, BatchIncomplete):
            summary = summary.summary
        assert isinstance(summary, RunSummary), summary
        return summary

    def staged(self) -> list[str]:
        """The image keys in the bucket."""
        listing = self.s3.client().list_objects_v2(Bucket=self.bucket).get("Contents", [])
        return [o["Key"] for o in listing if "/manifests/" not in o["Key"]]


@pytest.fixture
def batch(local_s3: LocalS3Server, s3_bucket: str, unique: str, tmp_path: Path) -> Batch:
    return Batch(local_s3, s3_bucket, unique, tmp_path)


# -- the signature --------------------------------------------------------------------------------


def test_the_verifier_takes_fals_signature_and_refuses_forged_stale_and_missing_ones(
    fal_emulator: FalEmulator,
) -> None:
    keys = JwksKeys(fal_emulator.base_url + JWKS_PATH)
    verifier = Verifier(keys)
    body = json.dumps({"request_id": RID, "status": "OK", "payload": {"images": []}}).encode()
    assert verifier.verify(fal_emulator.webhooks.sign(RID, body), body) == RID
    assert keys.fetches == 1  # cached
    refused = {
        "forged": sign(Ed25519PrivateKey.generate(), RID, body, int(time.time())),
        "stale": fal_emulator.webhooks.sign(RID, body, int(time.time()) - 3600),
        "future": fal_emulator.webhooks.sign(RID, body, int(time.time()) + 3600),
        "missing": {
            k: v
            for k, v in fal_emulator.webhooks.sign(RID, body).items()
            if k != "X-Fal-Webhook-Signature"
        },
        "other body": fal_emulator.webhooks.sign(RID, body + b" "),
        "other id": fal_emulator.webhooks.sign(RID.replace("8", "9"), body)
        | {"X-Fal-Webhook-Request-Id": RID},
    }
    for name, headers in refused.items():
        with pytest.raises(SignatureRejected) as caught:
            verifier.verify(headers, body)
        assert headers.get("X-Fal-Webhook-Signature", "-") not in caught.value.reason, name
    # a skew inside 300 s is accepted
    assert verifier.verify(fal_emulator.webhooks.sign(RID, body, int(time.time()) - 200), body)


def test_an_unknown_key_refreshes_the_key_set_once_then_waits(fal_emulator: FalEmulator) -> None:
    clock = [0.0]
    keys = JwksKeys(fal_emulator.base_url + JWKS_PATH, min_refresh_gap=60, clock=lambda: clock[0])
    verifier = Verifier(keys)
    body = b'{"request_id": "%s"}' % RID.encode()
    forged = sign(Ed25519PrivateKey.generate(), RID, body, int(time.time()))
    verifier.verify(fal_emulator.webhooks.sign(RID, body), body)
    clock[0] = 61.0
    with pytest.raises(SignatureRejected):
        verifier.verify(forged, body)
    with pytest.raises(SignatureRejected):
        verifier.verify(forged, body)
    assert keys.fetches == 2  # one refresh for an unknown key, not one per forgery
    clock[0] = 24 * 3600 + 62.0
    verifier.verify(fal_emulator.webhooks.sign(RID, body), body)
    assert keys.fetches == 3  # the 24 h cache expired


# -- the receiver ---------------------------------------------------------------------------------


@pytest.mark.timeout(900)  # the receiver process imports Prefect: minutes under load
def test_the_receiver_records_once_and_refuses_with_401_changing_nothing(
    receiver: Receiver, fal_emulator: FalEmulator
) -> None:
    from prefect_gptimage.tasks.callbacks import read_callback

    rid = f"{os.urandom(4).hex()}-660e-45cd-bd63-580e4f2a94cc"
    body = json.dumps(
        {"request_id": rid, "gateway_request_id": rid, "status": "OK", "payload": {"images": []}}
    ).encode()
    forged = sign(Ed25519PrivateKey.generate(), rid, body, int(time.time()))
    answer = httpx.post(receiver.url, content=body, headers=forged)
    assert answer.status_code == 401
    assert httpx.post(receiver.url, content=body).status_code == 401
    assert read_callback(rid) is None  # nothing recorded
    for expected in (True, False, False):  # fal re-delivers: recorded once
        answer = httpx.post(
            receiver.url, content=body, headers=fal_emulator.webhooks.sign(rid, body)
        )
        assert answer.status_code == 200 and answer.json()["recorded"] is expected
    callback = read_callback(rid)
    assert callback is not None and callback.status == "OK"
    stats = receiver.stats()
    assert stats["refused"] == 2 and stats["recorded"] == 1 and stats["duplicates"] == 2
    log = receiver.log.read_text()
    assert forged["X-Fal-Webhook-Signature"] not in log and "refused a callback" in log
    assert receiver.terminate() == 0  # SIGTERM: a clean exit


@pytest.mark.timeout(900)  # the receiver process imports Prefect: minutes under load
def test_a_batch_waits_on_callbacks_through_forged_replayed_duplicated_and_dropped_ones(
    webhooks_on: Receiver,
    fal_emulator: FalEmulator,
    batch: Batch,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PREFECT_GPTIMAGE_WEBHOOK_SWEEP_AFTER", "30")
    hooks = fal_emulator.webhooks
    for kind in ("forge", "replay", "duplicate", "drop"):
        hooks.inject(WebhookFault(kind, count=2))
    before, hooks_before = fal_emulator.stats, hooks.stats
    summary = batch.run(10)
    after, hooks_after = fal_emulator.stats, hooks.stats
    assert summary.failures == [] and len(batch.staged()) == 10
    assert after.accepted - before.accepted == 10  # nothing paid twice
    assert after.duplicate_submits == before.duplicate_submits
    assert hooks_after.registered - hooks_before.registered == 10  # every submit carried the URL
    assert after.status - before.status <= 5  # at most 0.5 status calls per request
    assert after.status_stream == before.status_stream
    # every forged and replayed callback was refused
    assert hooks_after.forged_sent - hooks_before.forged_sent == 2
    assert hooks_after.forged_refused - hooks_before.forged_refused == 2
    assert hooks_after.replayed_sent - hooks_before.replayed_sent == 2
    assert hooks_after.replayed_refused - hooks_before.replayed_refused == 2
    assert hooks_after.dropped - hooks_before.dropped == 2
    stats = webhooks_on.stats()
    assert stats["refused"] == 4 and stats["recorded"] == 8 and stats["duplicates"] >= 2
    assert summary.swept == 2  # the dropped ones, recovered by the sweep
    # no staged image came from a forged payload
    assert all("forged" not in json.dumps(img) for img in summary.images)


@pytest.mark.timeout(900)  # the receiver process imports Prefect: minutes under load
def test_killing_the_receiver_mid_batch_loses_nothing(
    webhooks_on: Receiver,
    fal_emulator: FalEmulator,
    batch: Batch,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PREFECT_GPTIMAGE_WEBHOOK_SWEEP_AFTER", "900")  # re-delivery must do it
    fal_emulator.set_concurrency_limit(2)
    fal_emulator.set_latency(1.0)
    hooks = fal_emulator.webhooks
    # fal retries 10 times over 2 hours; here over ~7 minutes: a receiver started under load
    # takes minutes to import Prefect and answer
    hooks.retry_delays = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 90.0, 120.0)
    before, delivered_before = fal_emulator.stats, hooks.stats.delivered
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["summary"] = batch.run(8)
        except BaseException as exc:  # reported below
            result["error"] = exc

    # the session's Prefect settings (API, result storage) are context variables: copy them
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(run,), daemon=True)  # never hangs
    try:
        thread.start()
        deadline = time.monotonic() + RUN_S
        while hooks.stats.delivered == delivered_before and time.monotonic() < deadline:
            time.sleep(0.05)
        webhooks_on.kill()  # SIGKILL mid-batch
        failed = hooks.stats.failed_attempts
        while hooks.stats.failed_attempts == failed and time.monotonic() < deadline:
            time.sleep(0.05)  # a callback found nobody there
        webhooks_on.start()  # again, on the same port
        thread.join(RUN_S)
    finally:
        fal_emulator.set_concurrency_limit(16)
    assert not thread.is_alive() and "error" not in result, result
    summary = result["summary"]
    assert summary.failures == [] and len(batch.staged()) == 8
    assert fal_emulator.stats.accepted - before.accepted == 8
    assert fal_emulator.stats.status - before.status == 0  # re-delivery, no sweep
    assert summary.swept == 0


@pytest.mark.timeout(900)  # the receiver process imports Prefect: minutes under load
def test_a_callback_recorded_before_the_row_looks_is_used_without_asking_fal(
    webhooks_on: Receiver, fal_emulator: FalEmulator, unique: str
) -> None:
    """fal called back before the run even wrote down its submit: the row finds the record,
    makes no status call and no result call (the callback carried the output)."""
    from prefect import flow

    from prefect_gptimage.fal.client import FalQueueClient
    from prefect_gptimage.schemas import GptImageRequest
    from prefect_gptimage.tasks.queue import fetch_recorded

    hooks = fal_emulator.webhooks
    request = GptImageRequest(prompt=f"an owl {unique}", quality="low")
    handle = FalQueueClient().submit(request, webhook_url=webhooks_on.url)
    deadline = time.monotonic() + RUN_S
    while handle.request_id not in hooks.stats.delivered_ids and time.monotonic() < deadline:
        time.sleep(0.05)
    before = fal_emulator.stats

    @flow
    def fetch_it() -> Any:
        return fetch_recorded(handle)

    output, cached = fetch_it()
    after = fal_emulator.stats
    assert not cached and len(output.images) == 1
    assert (after.status, after.result, after.status_stream) == (
        before.status,
        before.result,
        before.status_stream,
    )


def test_low_priority_marks_every_submit(
    fal_emulator: FalEmulator, monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    from prefect import flow

    from prefect_gptimage.schemas import GptImageRequest
    from prefect_gptimage.tasks.queue import submit_request

    monkeypatch.setenv("PREFECT_GPTIMAGE_QUEUE_PRIORITY", "low")
    before = fal_emulator.webhooks.stats

    @flow
    def submit_two() -> None:
        for what in ("a heron", "a crane"):
            submit_request(GptImageRequest(prompt=f"{what} {unique}", quality="low"))

    submit_two()
    after = fal_emulator.webhooks.stats
    assert after.low_priority == before.low_priority + 2
    assert after.registered == before.registered  # no webhook URL set: none sent


class _Sink:
    """A bare HTTP endpoint that answers ``codes`` in turn (then 200) and keeps what it got."""

    def __init__(self, codes: list[int]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        sink = self
        self.codes: list[int] = list(codes)
        self.got: list[tuple[float, dict[str, str], bytes]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sink.got.append((time.monotonic(), dict(self.headers), body))
                code = sink.codes.pop(0) if sink.codes else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


def test_the_emulator_retries_delays_and_withholds_callbacks(
    fal_emulator: FalEmulator, unique: str
) -> None:
    from prefect_gptimage.fal.client import FalQueueClient
    from prefect_gptimage.schemas import GptImageRequest

    hooks = fal_emulator.webhooks
    hooks.retry_delays = (0.2, 0.2, 0.2)
    sink = _Sink([500, 503])  # the first two attempts fail: retried
    client = FalQueueClient()

    def submit(what: str) -> str:
        request = GptImageRequest(prompt=f"{what} {unique}", quality="low")
        return client.submit(request, webhook_url=sink.url).request_id

    retried = submit("a gull")
    deadline = time.monotonic() + 60
    while retried not in hooks.stats.delivered_ids and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [json.loads(b)["request_id"] for _, _, b in sink.got] == [retried] * 3
    headers = sink.got[-1][1]
    assert headers["X-Fal-Webhook-User-Id"] and len(headers["X-Fal-Webhook-Signature"]) == 128

    hooks.inject(WebhookFault("never"))
    withheld = submit("a tern")
    hooks.inject(WebhookFault("late", delay=1.5))
    late = submit("a puffin")
    ended = time.monotonic()
    while late not in hooks.stats.delivered_ids and time.monotonic() < deadline:
        time.sleep(0.05)
    got = {json.loads(b)["request_id"]: t for t, _, b in sink.got}
    assert withheld not in got and got[late] - ended >= 1.0
    assert hooks.stats.never >= 1 and hooks.stats.late >= 1
    sink.server.shutdown()


def test_the_admin_api_reads_webhook_counters_and_injects_webhook_faults(
    fal_emulator: FalEmulator,
) -> None:
    admin = f"{fal_emulator.base_url}/_emulator"
    with httpx.Client() as http:  # SSL_CERT_FILE holds the emulator's CA
        answer = http.post(f"{admin}/webhooks/faults", json={"kind": "drop", "count": 2})
        assert answer.status_code == 200 and answer.json()["kind"] == "drop"
        assert http.post(f"{admin}/webhooks/faults", json={"kind": "nope"}).status_code == 400
        assert "dropped" in http.get(f"{admin}/webhooks").json()
    fal_emulator.webhooks.clear_faults()
