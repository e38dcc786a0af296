"""Every wait has a deadline, every body a size and time limit (issue 12, items 8 and 12).

Against the bundled emulator's ``stuck``, ``trickle`` and ``huge`` faults, through the unmodified
fal_client over HTTPS: a request queued forever, a result answered 202 forever, bodies trickled at
64 B/s and a 1 GiB result each end within their documented deadline, and memory stays bounded.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prefect import flow

from prefect_gptimage.errors import (
    FalRequestTimeout,
    PermanentFalError,
    SubmitOutcomeUnknown,
    TransientFalError,
)
from prefect_gptimage.fal._transport import FalTransport
from prefect_gptimage.fal._wait import DEFAULT_REQUEST_TIMEOUT, WaitTracker
from prefect_gptimage.fal.client import BodyLimits, FalQueueClient, RetryPolicy
from prefect_gptimage.schemas import GenerationResult, GptImageRequest, RequestHandle
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.generate import generate_images
from prefect_gptimage.tasks.options import GenerationOptions
from prefect_gptimage.testing import FalEmulator, Fault

#: A short retry budget, no cap on attempts: the budget alone must end each case.
BUDGET = RetryPolicy(budget=2.0, initial_delay=0.05, max_delay=0.2)


def req(unique: str, **kw: object) -> GptImageRequest:
    return GptImageRequest(prompt=f"a slow kite {unique}", quality="low", **kw)  # type: ignore[arg-type]


def rss() -> int:
    """The process's resident set size now, in bytes (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples RSS every 10 ms while active: the peak *during* a block, not the process's."""

    def __enter__(self) -> PeakRss:
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


# --- the emulator's new faults ------------------------------------------------------------------


def test_new_fault_kinds_parse_and_validate() -> None:
    assert Fault.parse("status:stuck:*").count is None
    assert Fault.parse("result:trickle:1:0.5").delay == pytest.approx(0.5)
    assert Fault.parse("media:trickle").delay == pytest.approx(1.0)  # 64 B/s
    assert Fault.parse("result:huge:1:300000000").size == 300_000_000
    assert Fault("result", "huge").size == 1 << 30
    with pytest.raises(ValueError, match="status"):
        Fault("submit", "stuck")
    with pytest.raises(ValueError, match="result"):
        Fault("status", "huge")


# --- 8a: a request that stays IN_QUEUE forever ----------------------------------------------


def test_default_deadline_applies_when_none_is_given() -> None:
    handle = RequestHandle(endpoint="fal-ai/gpt-image-1.5", request_id=str(uuid.uuid4()))
    track = WaitTracker(handle, None, __import__("logging").getLogger("t"))
    assert track.deadline - track.started == pytest.approx(DEFAULT_REQUEST_TIMEOUT)
    assert DEFAULT_REQUEST_TIMEOUT == 600
    assert get_settings().request_timeout == 600


def test_request_stuck_in_queue_is_cancelled_at_its_deadline(
    fal_emulator: FalEmulator, unique: str
) -> None:
    fal_emulator.set_latency(30.0)  # still running at fal when the deadline passes
    client = FalQueueClient(retry=BUDGET)
    handle = client.submit(req(unique))
    fal_emulator.inject(Fault("status", "stuck", count=None, match=unique))
    cancelled = fal_emulator.stats["cancelled"]
    started = time.monotonic()
    with pytest.raises(FalRequestTimeout, match="it was cancelled"):
        client.wait(handle, timeout=1.5)
    # not before its deadline; the upper bound is only a generous one (a loaded machine is slow)
    assert 1.5 <= time.monotonic() - started < 120
    info = fal_emulator.request(handle.request_id)
    assert info is not None and info.error_type == "client_cancelled"  # cancelled at fal
    assert fal_emulator.stats["cancelled"] == cancelled + 1


@flow
def one(request: GptImageRequest, output_dir: str) -> GenerationResult:
    return generate_images(request, GenerationOptions(output_dir=output_dir))


def test_generate_uses_the_request_timeout_setting(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No timeout given: PREFECT_GPTIMAGE_REQUEST_TIMEOUT (600 s by default) ends the wait.
    Timed at fal (submitted to cancelled), so a slow flow start does not count: not before the
    2 s, and far before the default 600 s (a generous deadline for a loaded machine)."""
    monkeypatch.setenv("PREFECT_GPTIMAGE_REQUEST_TIMEOUT", "2")
    fal_emulator.set_latency(30.0)
    fal_emulator.inject(Fault("status", "stuck", count=None, match=unique))
    cancelled = fal_emulator.stats["cancelled"]
    with pytest.raises(FalRequestTimeout):
        one(req(unique), str(tmp_path))
    assert fal_emulator.stats["cancelled"] == cancelled + 1
    [info] = [r for r in fal_emulator.requests() if unique in str(r.arguments.get("prompt"))]
    assert info.error_type == "client_cancelled" and info.completed_at is not None
    assert 2 <= info.completed_at - info.submitted_at < 120


# --- 8b: a result answered 202 forever -----------------------------------------------------


def test_result_answered_202_forever_ends_within_the_retry_budget(
    fal_emulator: FalEmulator, unique: str
) -> None:
    client = FalQueueClient(retry=BUDGET)
    handle = client.submit(req(unique))
    client.wait(handle)
    fal_emulator.inject(Fault("result", "stuck", count=None, match=unique))
    calls = fal_emulator.stats["result"]
    started = time.monotonic()
    with pytest.raises(TransientFalError, match=r"not ready yet.*gave up after"):
        client.result(handle)
    elapsed = time.monotonic() - started
    assert BUDGET.budget <= elapsed < BUDGET.budget + 60  # the budget, then a generous margin
    # retried (a loaded machine may fit only two attempts in 2 s), with backoff, not a hot loop
    assert 2 <= fal_emulator.stats["result"] - calls < 40


# --- 8c: bodies trickled at 64 B/s ----------------------------------------------------------


@pytest.mark.parametrize("operation", ["status", "result"])
def test_trickled_queue_bodies_hit_their_time_limit(
    fal_emulator: FalEmulator, unique: str, operation: str
) -> None:
    client = FalQueueClient(retry=BUDGET, limits=BodyLimits(timeout=0.5))
    handle = client.submit(req(unique))
    if operation == "result":
        client.wait(handle)
    fal_emulator.inject(Fault(operation, "trickle", count=None, delay=0.2, match=unique))  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(TransientFalError, match="body too slow"):
        client.wait(handle) if operation == "status" else client.result(handle)
    # each attempt stops at the body limit (0.5 s + one piece), the budget ends the retries
    assert time.monotonic() - started < BUDGET.budget + 60


def test_one_trickled_result_is_retried_and_recovered(
    fal_emulator: FalEmulator, unique: str
) -> None:
    client = FalQueueClient(retry=BUDGET, limits=BodyLimits(timeout=0.5))
    handle, _ = client.run(req(unique))
    fal_emulator.inject(Fault("result", "trickle", count=1, delay=0.2, match=unique))
    fired = fal_emulator.stats["faults_fired"]
    assert client.result(handle).images
    assert fal_emulator.stats["faults_fired"] == fired + 1


def test_a_trickled_body_at_the_default_pace_is_read_when_it_fits_the_limit(
    fal_emulator: FalEmulator, unique: str
) -> None:
    """A slow but bounded body is not an error: the limit is on total time, not on pace."""
    client = FalQueueClient(retry=BUDGET, limits=BodyLimits(timeout=30))
    handle = client.submit(req(unique))
    fal_emulator.inject(Fault("status", "trickle", count=1, delay=0.01, match=unique))
    assert client.status(handle).state in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")


# --- 12: result bodies are bounded before they are read -------------------------------------


def test_huge_result_fails_permanently_with_bounded_memory(
    fal_emulator: FalEmulator, unique: str
) -> None:
    """A 1 GiB result (no Content-Length, streamed) stops at the 36 MiB default, unretried."""
    client = FalQueueClient(retry=BUDGET)
    handle, _ = client.run(req(unique))
    fal_emulator.inject(Fault("result", "huge", count=None, size=1 << 30, match=unique))
    calls = fal_emulator.stats["result"]
    started = time.monotonic()
    limit = f"over the {36 * 2**20}-byte limit"
    with PeakRss() as mem, pytest.raises(PermanentFalError, match=limit):
        client.result(handle)
    assert fal_emulator.stats["result"] == calls + 1  # permanent: not retried
    assert time.monotonic() - started < 120  # ends soon (the counter shows: one read, stopped)
    # the cap plus the chunks list and TLS buffers: far below the 1 GiB body (and 500 MB)
    print(f"huge result: RSS {mem.base / 2**20:.0f} MiB -> peak {mem.peak / 2**20:.0f} MiB")
    assert mem.growth < 200 * 2**20, f"RSS grew by {mem.growth / 2**20:.0f} MiB"


def test_huge_result_is_never_cached(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    fal_emulator.inject(Fault("result", "huge", count=1, size=80 * 2**20, match=unique))
    with pytest.raises(PermanentFalError, match="byte limit"):
        one(req(unique), str(tmp_path))
    calls, accepted = fal_emulator.stats["result"], fal_emulator.stats["accepted"]
    result = one(req(unique), str(tmp_path))  # the same request: its submit is reused ...
    assert len(result.images) == 1
    assert fal_emulator.stats["result"] == calls + 1  # ... and the result fetched anew
    assert fal_emulator.stats["accepted"] == accepted


class _Exploding(httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        raise AssertionError("the body must not be read")


def _transport(response: httpx.Response, limits: BodyLimits) -> httpx.Client:
    inner = httpx.MockTransport(lambda request: response)
    return httpx.Client(transport=FalTransport(inner, limits))


def test_declared_oversized_body_is_refused_before_reading() -> None:
    response = httpx.Response(200, headers={"content-length": str(10**10)}, stream=_Exploding())
    with (
        _transport(response, BodyLimits(max_bytes=1000)) as http,
        pytest.raises(PermanentFalError, match="over the 1000-byte limit"),
    ):
        http.get("https://queue.example/fal-ai/gpt-image-1.5/requests/r1")


def test_oversized_submit_answer_is_an_unknown_outcome() -> None:
    response = httpx.Response(200, content=b"x" * 2000)
    with (
        _transport(response, BodyLimits(max_bytes=1000)) as http,
        pytest.raises(SubmitOutcomeUnknown),
    ):
        http.post("https://queue.example/fal-ai/gpt-image-1.5", json={})


def test_oversized_error_body_keeps_its_status_verdict() -> None:
    response = httpx.Response(503, content=b"x" * (2 << 20))
    with _transport(response, BodyLimits()) as http, pytest.raises(TransientFalError, match="503"):
        http.get("https://queue.example/fal-ai/gpt-image-1.5/requests/r1/status")


def test_gzip_bomb_is_bounded_after_decoding() -> None:
    import gzip

    bomb = gzip.compress(b"0" * (4 << 20))  # 4 MiB of zeros, a few KiB on the wire
    response = httpx.Response(200, headers={"content-encoding": "gzip"}, content=bomb)
    with (
        _transport(response, BodyLimits(max_bytes=1 << 20)) as http,
        pytest.raises(PermanentFalError, match="byte limit"),
    ):
        http.get("https://queue.example/fal-ai/gpt-image-1.5/requests/r1")
