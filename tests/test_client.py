"""The client layer against the bundled emulator, through the unmodified fal_client over HTTPS.

Every fault is injected into the emulator; nothing in fal_client or httpx is patched.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from prefect_gptimage.errors import (
    ConfigurationError,
    FalRequestFailed,
    FalRequestTimeout,
    InvalidRequestError,
    SubmitOutcomeUnknown,
    TransientFalError,
)
from prefect_gptimage.fal.async_client import AsyncFalQueueClient
from prefect_gptimage.fal.client import FalQueueClient, RetryPolicy
from prefect_gptimage.fal.polling import LATENCY
from prefect_gptimage.schemas import GptImageEditRequest, GptImageRequest
from prefect_gptimage.testing import FalEmulator, Fault

FAST = RetryPolicy(attempts=4, initial_delay=0.01, max_delay=0.05)


@pytest.fixture
def client() -> FalQueueClient:
    return FalQueueClient(retry=FAST)


def req(unique: str, **kw: object) -> GptImageRequest:
    return GptImageRequest(prompt=f"a lighthouse {unique}", quality="low", **kw)  # type: ignore[arg-type]


def test_round_trip(client: FalQueueClient, fal_emulator: FalEmulator, unique: str) -> None:
    before = fal_emulator.stats["accepted"]
    handle = client.submit(req(unique, num_images=2, image_size="1536x1024"))
    assert fal_emulator.stats["accepted"] == before + 1
    assert handle.endpoint == "fal-ai/gpt-image-1.5"
    status = client.wait(handle)
    assert status.done and status.error is None
    output = client.result(handle)
    assert [(i.width, i.height) for i in output.images] == [(1536, 1024), (1536, 1024)]
    # the handle is plain data: it survives a JSON round trip (Prefect persists it)
    assert type(handle).model_validate_json(handle.model_dump_json()) == handle


def test_edit_endpoint_uses_owner_app_urls(
    client: FalQueueClient, fal_emulator: FalEmulator, unique: str
) -> None:
    first = client.run(req(unique))[1].images[0].url
    edit = GptImageEditRequest(prompt=f"night version {unique}", image_urls=[first], quality="low")
    handle, output = client.run(edit)
    assert handle.endpoint == "fal-ai/gpt-image-1.5/edit"
    assert "/edit/" not in (handle.status_url or "")
    assert len(output.images) == 1


@pytest.mark.parametrize(
    "kind", ["500_json", "503_json", "502_json", "504_json", "429", "503_ingress"]
)
@pytest.mark.parametrize("operation", ["status", "result"])
def test_transient_faults_on_idempotent_calls_are_recovered(
    client: FalQueueClient, fal_emulator: FalEmulator, unique: str, kind: str, operation: str
) -> None:
    handle = client.submit(req(unique))
    before, fired = fal_emulator.stats["accepted"], fal_emulator.stats["faults_fired"]
    fal_emulator.inject(Fault(operation, kind, count=2))  # type: ignore[arg-type]
    client.wait(handle)
    assert client.result(handle).images
    assert fal_emulator.stats["faults_fired"] == fired + 2  # both faults met, both recovered
    assert fal_emulator.stats["accepted"] == before  # nothing submitted again


def test_persistent_server_error_surfaces_as_transient(
    client: FalQueueClient, fal_emulator: FalEmulator, unique: str
) -> None:
    handle = client.submit(req(unique))
    fal_emulator.inject(Fault("status", "500_json", count=None))
    with pytest.raises(TransientFalError) as info:
        client.status(handle)
    assert info.value.status_code == 500
    assert info.value.error_type == "runner_server_error"


def test_missing_credentials_fail_before_any_request(
    fal_emulator: FalEmulator, unique: str, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    for var in ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FAL_HOME_DIR", str(tmp_path))  # no `fal auth login` token either
    before = fal_emulator.stats["submit"]
    with pytest.raises(ConfigurationError, match="FAL_KEY"):
        FalQueueClient(retry=FAST).submit(req(unique))
    assert fal_emulator.stats["submit"] == before


@pytest.mark.parametrize("kind", ["drop_after_accept", "drop", "502_ingress", "504_ingress"])
def test_ambiguous_submit_failures_are_never_retried(
    client: FalQueueClient, fal_emulator: FalEmulator, unique: str, kind: str
) -> None:
    before = fal_emulator.stats["submit"]
    fal_emulator.inject(Fault("submit", kind, count=1))  # type: ignore[arg-type]
    with pytest.raises(SubmitOutcomeUnknown) as info:
        client.submit(req(unique))
    assert "not retried" in str(info.value)
    assert fal_emulator.stats["submit"] == before + 1  # exactly one POST reached the server


def test_submit_accepted_but_answered_with_error_is_adopted(
    client: FalQueueClient, fal_emulator: FalEmulator, unique: str
) -> None:
    fal_emulator.inject(Fault("submit", "error_after_accept", count=1))
    before, duplicates = fal_emulator.stats["accepted"], fal_emulator.stats["duplicate_submits"]
    handle = client.submit(req(unique))
    assert fal_emulator.stats["accepted"] == before + 1
    assert fal_emulator.stats["duplicate_submits"] == duplicates  # a delta: others resubmit
    client.wait(handle)
    assert client.result(handle).images


def test_rejected_submits_are_retried_by_fal_client(
    client: FalQueueClient, fal_emulator: FalEmulator, unique: str
) -> None:
    before = fal_emulator.stats["accepted"]
    fal_emulator.inject(Fault("submit", "429", count=2))
    fal_emulator.inject(Fault("submit", "503_ingress", count=1))
    client.submit(req(unique))
    assert fal_emulator.stats["accepted"] == before + 1


def test_submit_5xx_that_was_not_enqueued_is_resent_once_confirmed(
    client: FalQueueClient, fal_emulator: FalEmulator, unique: str
) -> None:
    """A 5xx whose request id fal does not know was never enqueued: the client resends it."""
    accepted, posts = fal_emulator.stats["accepted"], fal_emulator.stats["submit"]
    fal_emulator.inject(Fault("submit", "503_json", count=1))
    handle = client.submit(req(unique))
    assert fal_emulator.stats["submit"] == posts + 2  # the refused POST, then one resend
    assert fal_emulator.stats["accepted"] == accepted + 1  # paid once
    assert fal_emulator.request(handle.request_id) is not None


def test_submit_5xx_that_keeps_failing_surfaces_as_transient(
    fal_emulator: FalEmulator, unique: str
) -> None:
    accepted = fal_emulator.stats["accepted"]
    fal_emulator.inject(Fault("submit", "503_json", count=None, match=unique))
    with pytest.raises(TransientFalError, match="gave up after 4 attempts"):
        FalQueueClient(retry=FAST).submit(req(unique))
    assert fal_emulator.stats["accepted"] == accepted


def test_failed_request_carries_fals_message(
    client: FalQueueClient, fal_emulator: FalEmulator, unique: str
) -> None:
    fal_emulator.inject(Fault("submit", "fail", status_code=422, match=unique))
    handle = client.submit(req(unique))
    with pytest.raises(FalRequestFailed) as info:
        client.wait(handle)
    assert info.value.error_type == "content_policy_violation"
    assert not info.value.resubmittable
    assert info.value.request_id == handle.request_id

    fal_emulator.inject(Fault("submit", "fail", match=unique))
    handle = client.submit(req(unique, num_images=2))
    with pytest.raises(FalRequestFailed) as info:
        client.wait(handle)
    assert info.value.resubmittable


def test_deadline_cancels_the_request(
    client: FalQueueClient, fal_emulator: FalEmulator, unique: str
) -> None:
    fal_emulator.set_latency(5.0)
    cancelled = fal_emulator.stats["cancelled"]
    handle = client.submit(req(unique))
    with pytest.raises(FalRequestTimeout):
        client.wait(handle, timeout=0.5)
    info = fal_emulator.request(handle.request_id)
    assert info is not None
    assert info.status == "COMPLETED" and info.error_type == "client_cancelled"
    assert fal_emulator.stats["cancelled"] == cancelled + 1
    assert client.cancel(handle) is False  # already over


def test_logs_and_queue_position_reach_the_logger(
    client: FalQueueClient, fal_emulator: FalEmulator, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    fal_emulator.set_latency(0.3)
    handle = client.submit(req(unique))
    log = logging.getLogger("test.wait")
    with caplog.at_level(logging.INFO, logger="test.wait"):
        client.wait(handle, log=log)
    assert any(r.message.startswith("fal [") for r in caplog.records)


def test_adaptive_polling_is_frugal(
    client: FalQueueClient, fal_emulator: FalEmulator, unique: str
) -> None:
    """fal_client polls every 0.1 s (~10 calls per second of generation); we learn the latency."""
    LATENCY.clear()
    fal_emulator.set_latency(1.0)
    calls, lateness = [], []
    for i in range(6):
        before = fal_emulator.stats["status"]
        handle = client.submit(req(f"{unique}-{i}"))
        client.wait(handle)
        calls.append(fal_emulator.stats["status"] - before)
        info = fal_emulator.request(handle.request_id)
        assert info is not None and info.completed_at is not None
        lateness.append(time.time() - info.completed_at)
    assert sum(calls[1:]) / 5 <= 2.0, calls  # the first request teaches the model
    # and it is not paid for with delay: here only "not a whole latency late" (a loaded machine
    # adds its own delay to every wall-clock reading); the schedule's lateness itself, under 5%
    # of the latency, is test_polling's, on a simulated clock
    assert sum(lateness[1:]) / 5 < 1.0, lateness


def test_async_client_round_trip_with_faults(fal_emulator: FalEmulator, unique: str) -> None:
    async def main() -> int:
        client = AsyncFalQueueClient(retry=FAST)
        handle = await client.submit(req(unique))
        fal_emulator.inject(Fault("status", "500_json", count=2))
        fal_emulator.inject(Fault("result", "503_json", count=1))
        await client.wait(handle)
        output = await client.result(handle)
        return len(output.images)

    fired, accepted = fal_emulator.stats["faults_fired"], fal_emulator.stats["accepted"]
    assert asyncio.run(main()) == 1
    assert fal_emulator.stats["faults_fired"] == fired + 3  # every fault met and recovered
    assert fal_emulator.stats["accepted"] == accepted + 1


def test_async_client_does_not_retry_an_ambiguous_submit(
    fal_emulator: FalEmulator, unique: str
) -> None:
    async def main() -> None:
        await AsyncFalQueueClient(retry=FAST).submit(req(unique))

    before = fal_emulator.stats["submit"]
    fal_emulator.inject(Fault("submit", "drop_after_accept", count=1))
    with pytest.raises(SubmitOutcomeUnknown):
        asyncio.run(main())
    assert fal_emulator.stats["submit"] == before + 1


def test_start_timeout_is_checked_before_anything_is_sent(
    client: FalQueueClient, fal_emulator: FalEmulator, unique: str
) -> None:
    before = fal_emulator.stats["submit"]
    with pytest.raises(InvalidRequestError, match="start_timeout"):
        client.submit(req(unique), start_timeout=0.5)
    assert fal_emulator.stats["submit"] == before  # nothing sent, so nothing possibly billed
    handle = client.submit(req(unique), start_timeout=30.0)  # sent as X-Fal-Request-Timeout
    assert fal_emulator.request(handle.request_id) is not None
