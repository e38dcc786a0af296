"""S3 outages are ridden out (issue 12, item 16): S3 gets the same retry budget as fal.

S3 sits behind a small TCP proxy in front of the suite's moto server. The proxy can *stop*
(its port closed: connection refused, as a stopped server; open connections cut) or answer every
request with S3's ``503 SlowDown``. The CLI runs a small batch as a user runs it; S3 goes away
once fal has accepted the first submit, for about 6 s, while the rows finish at fal and reach
staging. With a retry budget of 15 s every row must be staged, and nothing paid twice.
"""

from __future__ import annotations

import contextlib
import doctest
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prefect_gptimage.errors import TransientS3StagingError
from prefect_gptimage.retry import RetryPolicy
from prefect_gptimage.s3 import (
    S3Target,
    get_s3_client,
    probe_bucket,
    stage_file,
    stage_image_task,
    stage_manifest_task,
)
from prefect_gptimage.s3.clients import client_from_block
from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

ROWS = 6
OUTAGE = 6.0
BUDGET = 15.0

_SLOWDOWN_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>proxy</RequestId></Error>"
)


class FaultyS3Proxy:
    """A TCP proxy to an S3 endpoint that can stop listening or answer ``503 SlowDown``.

    ``mode``: ``pass`` (bytes forwarded both ways), ``down`` (the port is closed) or
    ``slowdown`` (each request read, then answered 503 SlowDown, connection closed). Every
    change of mode cuts the connections open at that moment (botocore keeps them alive).
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.slowdowns = 0
        self.forwarded = 0
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultyS3Proxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def set_mode(self, mode: str) -> None:
        if mode == "down" and self._listener is not None:
            # wakes the thread blocked in accept(); close() alone would not stop listening
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        self.mode = mode
        self._cut_all()
        if mode != "down" and self._listener is None:
            self.start()

    def outage(self, mode: str, seconds: float) -> threading.Thread:
        """``mode`` from now (set before this returns, so a call made next meets it), then
        ``pass`` again after ``seconds`` (in the background)."""
        self.set_mode(mode)

        def run() -> None:
            time.sleep(seconds)
            self.set_mode("pass")

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.set_mode("down")

    def _cut_all(self) -> None:
        with self._lock:
            live, self._live = list(self._live), set()
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._live.add(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the proxy is down (or stopped)
            self._track(conn)
            handler = self._slowdown if self.mode == "slowdown" else self._forward
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    def _forward(self, conn: socket.socket) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            conn.close()
            return
        up.settimeout(None)
        self._track(up)
        with self._lock:
            self.forwarded += 1

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(up, conn), daemon=True).start()
        pump(conn, up)

    def _slowdown(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method = lines[0].split(" ", 1)[0]
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
            }
            if headers.get("expect", "").lower() != "100-continue":
                left = int(headers.get("content-length", "0") or 0) - len(body)
                while left > 0:
                    chunk = conn.recv(min(left, 65536))
                    if not chunk:
                        break
                    left -= len(chunk)
            payload = b"" if method == "HEAD" else _SLOWDOWN_XML
            conn.sendall(
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(_SLOWDOWN_XML if method != "HEAD" else b""), payload)
            )
            with self._lock:
                self.slowdowns += 1
        except OSError:
            pass
        finally:
            conn.close()


@pytest.fixture
def proxy(s3: LocalS3Server) -> Iterator[FaultyS3Proxy]:
    server = FaultyS3Proxy((s3.host, s3.port)).start()
    try:
        yield server
    finally:
        server.stop()


def _client(endpoint_url: str) -> Any:
    """A client for ``endpoint_url`` configured as the package configures its own."""
    from prefect_aws import AwsCredentials

    credentials = AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        aws_client_parameters={"endpoint_url": endpoint_url},
    )
    return client_from_block(credentials)


# --- one layer, one budget ---------------------------------------------------------------------


def test_one_layer_retries_s3() -> None:
    """botocore makes one try per call and the tasks add no Prefect retries: the staging call
    itself retries, under the package's policy (the same budget as fal's)."""
    assert get_s3_client().meta.config.retries["total_max_attempts"] == 1
    for task in (stage_image_task, stage_manifest_task):
        assert task.retries == 0 and not task.retry_condition_fn


def test_policy_from_settings_is_the_one_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_GPTIMAGE_RETRY_BUDGET", "7")
    monkeypatch.setenv("PREFECT_GPTIMAGE_RETRY_MAX_DELAY", "0.5")
    assert RetryPolicy.from_settings() == RetryPolicy(budget=7, max_delay=0.5)


def test_s3_rows_of_the_retry_table_docstrings() -> None:
    import prefect_gptimage._retry_s3 as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False)
    assert result.attempted > 0 and result.failed == 0


def test_a_short_outage_is_ridden_out_and_a_long_one_ends_in_budget(
    proxy: FaultyS3Proxy, s3_bucket: str, tmp_path: Path
) -> None:
    client = _client(proxy.endpoint_url)
    target = S3Target(bucket=s3_bucket)
    path = tmp_path / "m.jsonl"
    path.write_text("{}\n")
    key = f"{target.prefix}/manifests/outage.jsonl"

    # the budgets are far longer than the outages: a loaded machine's late thread wake-ups
    # cannot outlast them
    started = time.monotonic()
    proxy.outage("down", 1.5)
    staged = stage_file(path, key, "application/x-ndjson", target, client, RetryPolicy(budget=30))
    assert time.monotonic() - started >= 1.5 and staged.bytes == 3  # not before S3 was back

    proxy.outage("slowdown", 1.5)
    probe_bucket(target, client, RetryPolicy(budget=30, max_delay=0.3))
    assert proxy.slowdowns >= 1

    proxy.set_mode("down")
    started = time.monotonic()
    with pytest.raises(TransientS3StagingError, match=r"gave up after \d+ attempts in"):
        stage_file(path, key, "application/x-ndjson", target, client, RetryPolicy(budget=1.5))
    took = time.monotonic() - started
    assert 1.5 <= took < 1.5 + 60, took  # the budget, then a generous deadline


# --- the CLI, a batch, S3 gone for 6 s in the middle ---------------------------------------------


def _cli_env(harness: dict[str, Any], proxy: FaultyS3Proxy, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FAL_KEY": "outage-key-id:outage-key-secret",
        "PREFECT_API_URL": str(harness["api_url"]),
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
        "PREFECT_GPTIMAGE_OUTPUT_DIR": str(tmp_path / "images"),
        "PREFECT_GPTIMAGE_RETRY_BUDGET": str(BUDGET),
        "AWS_ENDPOINT_URL_S3": proxy.endpoint_url,
    }


@pytest.mark.parametrize("mode", ["down", "slowdown"])
def test_batch_rides_out_an_s3_outage(
    fal_emulator: FalEmulator,
    proxy: FaultyS3Proxy,
    s3: LocalS3Server,
    s3_bucket: str,
    prefect_harness: dict[str, Any],
    unique: str,
    tmp_path: Path,
    mode: str,
) -> None:
    fal_emulator.set_latency(1.5)
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"outage row {i} {unique}", "quality": "low"}) + "\n"
            for i in range(ROWS)
        )
    )
    args = [sys.executable, "-m", "prefect_gptimage.cli", "batch", str(path)]
    args += ["--bucket", s3_bucket, "--concurrency", "3", "--json"]
    before = fal_emulator.stats
    proc = subprocess.Popen(
        args,
        env=_cli_env(prefect_harness, proxy, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while fal_emulator.stats["accepted"] == before["accepted"] and proc.poll() is None:
            assert time.monotonic() < deadline, "no submit reached fal in 120 s"
            time.sleep(0.01)
        # the preflight wrote to S3 before the first submit; now S3 goes away while rows run:
        # for OUTAGE s, and on until a row has downloaded its image (it stages next) and, for
        # SlowDown, met one. A row stages only after its download, so no row has been retrying
        # longer than OUTAGE s when S3 comes back, well inside the budget, however slow the
        # machine is.
        at_start = fal_emulator.stats
        proxy.set_mode(mode)
        ends = time.monotonic() + OUTAGE
        deadline = time.monotonic() + 120
        while (
            time.monotonic() < ends
            or fal_emulator.stats["media"] == at_start["media"]
            or (mode == "slowdown" and proxy.slowdowns == 0)
        ):
            assert time.monotonic() < deadline, "no row reached staging in 120 s"
            assert proc.poll() is None, "the batch ended during the outage"
            time.sleep(0.05)
        at_end = fal_emulator.stats
        proxy.set_mode("pass")
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    finished_meanwhile = at_end["media"] - at_start["media"]
    print(
        f"{mode}: {finished_meanwhile} image(s) downloaded during the {OUTAGE:.0f}s outage, "
        f"{proxy.slowdowns} SlowDown answer(s), exit {proc.returncode}"
    )
    assert finished_meanwhile >= 1, "no row reached staging during the outage"
    if mode == "slowdown":
        assert proxy.slowdowns >= 1
    assert proc.returncode == 0, stderr[-4000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["failures"] == [] and summary["staged"] == ROWS, stderr[-4000:]
    after = fal_emulator.stats
    assert after["accepted"] - before["accepted"] == ROWS  # each row paid exactly once
    assert after["duplicate_submits"] == before["duplicate_submits"]
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert len([k for k in keys if "/manifests/" not in k]) == ROWS
    assert any("/manifests/" in k for k in keys)
