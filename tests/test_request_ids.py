"""fal's answers are checked before use (issue 18): a request id must be a fal request id (a
UUID), and the queue URLs fal returns are followed only on the queue host and for that request.

The emulator answers submits with forged ids (``/``, ``..``, an absolute path, another request's
id): a malformed one leaves the request paid with its outcome unknown, and is never used as a
URL, a key or a file name; a well-formed foreign one is caught by the run's request-id ledger.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prefect import flow
from prefect.settings import get_current_settings
from pydantic import ValidationError

from prefect_gptimage.errors import (
    DuplicateRequestId,
    FalError,
    PermanentFalError,
    SubmitOutcomeUnknown,
    TransientFalError,
)
from prefect_gptimage.fal import _core
from prefect_gptimage.fal._ops import Outcome, Status, queue_urls
from prefect_gptimage.fal.async_client import AsyncFalQueueClient
from prefect_gptimage.fal.client import FalQueueClient, RetryPolicy
from prefect_gptimage.fal.polling import RequestState
from prefect_gptimage.ledger import RequestIdLedger, use_request_id_ledger
from prefect_gptimage.schemas import GenerationResult, GptImageRequest, RequestHandle
from prefect_gptimage.tasks.generate import generate_images
from prefect_gptimage.tasks.intents import OUTCOME_UNKNOWN, read_intent
from prefect_gptimage.tasks.options import GenerationOptions
from prefect_gptimage.testing import FalEmulator, Fault

FAST = RetryPolicy(attempts=4, initial_delay=0.01, max_delay=0.05)
MALFORMED = ["id_slash", "id_dotdot", "id_absolute"]
RID = "80e732af-660e-45cd-bd63-580e4f2a94cc"
OTHER = "0b7f1c2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e"


def req(unique: str, **kw: object) -> GptImageRequest:
    return GptImageRequest(prompt=f"a tin lantern {unique}", quality="low", **kw)  # type: ignore[arg-type]


def calls(emulator: FalEmulator) -> tuple[int, int, int, int, int]:
    """Queue calls so far: accepted submits, POSTs, status, result and cancel calls, strays."""
    stats = emulator.stats
    return (
        stats["accepted"],
        stats["submit"],
        stats["status"] + stats["result"] + stats["cancel"],
        stats["status_stream"],
        emulator.stray_calls,
    )


def emulated_id(emulator: FalEmulator, unique: str) -> str:
    """The id the emulator really gave the request whose prompt names ``unique``."""
    [info] = [r for r in emulator.requests() if unique in str(r.arguments.get("prompt"))]
    return info.request_id


def paths_naming(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if text in str(p)] if root.exists() else []


# --- the checks themselves ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [f"{RID}/x", f"{RID}/../{OTHER}", f"/tmp/{RID}", "..", "", RID + "\n", 42]
)
def test_a_handle_holds_only_a_fal_request_id(value: object) -> None:
    with pytest.raises(ValidationError, match="not a fal request id"):
        RequestHandle(endpoint="fal-ai/gpt-image-1.5", request_id=value)  # type: ignore[arg-type]
    # a cached record read back goes through the same check
    record = {"endpoint": "fal-ai/gpt-image-1.5", "request_id": value}
    with pytest.raises(ValidationError, match="not a fal request id"):
        RequestHandle.model_validate(record)
    assert RequestHandle(endpoint="fal-ai/gpt-image-1.5", request_id=RID.upper()).request_id


def _handle(base: str, rid: str = RID, own: str = RID) -> RequestHandle:
    url = f"{base}/fal-ai/gpt-image-1.5/requests/{rid}"
    return RequestHandle(
        endpoint="fal-ai/gpt-image-1.5",
        request_id=own,
        response_url=url,
        status_url=f"{url}/status",
        cancel_url=f"{url}/cancel",
    )


@pytest.mark.parametrize(
    ("handle", "followed"),
    [
        (_handle("https://queue.fal.run"), True),
        (_handle("https://queue.fal.run", rid=OTHER), False),  # another request's record
        (_handle("https://queue.fal.run", rid=f"{OTHER}/../{RID}"), False),  # dot segments
        (_handle("https://queue.fal.run", rid=f"{OTHER}/%2e%2e/{RID}"), False),  # escaped
        (_handle("https://elsewhere.example"), False),  # another host
        (_handle("https://queue.fal.run:8443"), False),  # another port
        (_handle("http://queue.fal.run"), False),  # not https
        (_handle("https://user:pw@queue.fal.run"), False),  # credentials
    ],
)
def test_returned_urls_are_followed_only_for_this_request_on_the_queue_host(
    handle: RequestHandle, followed: bool
) -> None:
    assert (queue_urls(handle, httpx.URL("https://queue.fal.run/")) is not None) is followed


def test_a_5xx_naming_a_malformed_request_id_is_an_unknown_outcome() -> None:
    """The core (sans-IO): the id of a 5xx answer to a submit is never asked about."""
    steps = _core.submit(req("adopt"), FAST)
    driver = _core.Driver(steps)
    assert driver.op.name == "submit"
    refused = TransientFalError("fal submit failed with HTTP 503", status_code=503)
    refused.request_id = f"../{RID}"
    with pytest.raises(SubmitOutcomeUnknown, match="malformed request id") as info:
        driver.feed(Outcome(error=refused))
    assert info.value.request_id is None
    # a well-formed one is checked with fal first
    driver = _core.Driver(_core.submit(req("adopt"), FAST))
    refused = TransientFalError("fal submit failed with HTTP 503", status_code=503)
    refused.request_id = RID
    driver.feed(Outcome(error=refused))
    assert isinstance(driver.op, Status) and driver.op.handle.request_id == RID


# --- the client against the emulator ----------------------------------------------------------


@pytest.mark.parametrize("kind", MALFORMED)
def test_a_malformed_request_id_is_paid_unknown_and_used_nowhere(
    fal_emulator: FalEmulator, unique: str, kind: str
) -> None:
    before = calls(fal_emulator)
    fal_emulator.inject(Fault("submit", kind, match=unique))  # type: ignore[arg-type]
    with pytest.raises(SubmitOutcomeUnknown, match="malformed request id") as info:
        FalQueueClient(retry=FAST).submit(req(unique))
    assert "not retried" in str(info.value) and info.value.request_id is None
    accepted, posts, polls, streams, strays = calls(fal_emulator)
    assert (accepted, posts) == (before[0] + 1, before[1] + 1)  # paid for, sent once
    assert (polls, streams, strays) == before[2:]  # no call about it, on any path


@pytest.mark.parametrize("kind", MALFORMED)
def test_async_client_checks_the_request_id_too(
    fal_emulator: FalEmulator, unique: str, kind: str
) -> None:
    async def main() -> None:
        await AsyncFalQueueClient(retry=FAST).submit(req(unique))

    before = calls(fal_emulator)
    fal_emulator.inject(Fault("submit", kind, match=unique))  # type: ignore[arg-type]
    with pytest.raises(SubmitOutcomeUnknown, match="malformed request id"):
        asyncio.run(main())
    assert calls(fal_emulator)[1:] == (before[1] + 1, *before[2:])


def test_urls_naming_another_request_are_not_followed(
    fal_emulator: FalEmulator, unique: str
) -> None:
    """A handle whose URLs name another request (a forged answer, or a tampered cached record)
    still asks about its own request."""
    client = FalQueueClient(retry=FAST)
    done, _ = client.run(req(f"{unique}-a"))
    fal_emulator.inject(Fault("status", "stuck", count=None, match=f"{unique}-b"))
    own = client.submit(req(f"{unique}-b"))
    forged = own.model_copy(
        update={u: getattr(done, u) for u in ("status_url", "response_url", "cancel_url")}
    )
    assert client.status(forged).state is RequestState.IN_QUEUE  # its own state, not done's
    assert client.status(done).state is RequestState.COMPLETED
    fal_emulator.clear_faults()


def test_an_unvalidated_handle_is_checked_before_its_id_reaches_a_url(
    fal_emulator: FalEmulator,
) -> None:
    """A handle unpickled from a record (no validation runs) with a forged id."""
    forged = RequestHandle.model_construct(endpoint="fal-ai/gpt-image-1.5", request_id=f"../{RID}")
    client, before = FalQueueClient(retry=FAST), calls(fal_emulator)
    for call in (client.status, client.result, client.cancel, client.wait):
        with pytest.raises(PermanentFalError, match="not a fal request id"):
            call(forged)
    assert calls(fal_emulator) == before


# --- through a Prefect flow ------------------------------------------------------------------


@flow
def gen(request: GptImageRequest, options: GenerationOptions) -> GenerationResult:
    return generate_images(request, options)


@flow
def gen_two(
    first: GptImageRequest, second: GptImageRequest, options: GenerationOptions
) -> list[GenerationResult | BaseException]:
    """Two rows of one run, under the run's request-id ledger, as the batch flows do."""
    out: list[GenerationResult | BaseException] = []
    with use_request_id_ledger(RequestIdLedger()):
        for request in (first, second):
            try:
                out.append(generate_images(request, options))
            except FalError as exc:
                out.append(exc)
    return out


@pytest.fixture
def storage() -> Iterator[Path]:
    yield Path(get_current_settings().results.local_storage_path).expanduser()


@pytest.mark.parametrize("kind", MALFORMED)
def test_flow_with_a_malformed_request_id_reports_it_paid_and_never_uses_it(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path, storage: Path, kind: str
) -> None:
    request, options = req(unique), GenerationOptions(output_dir=str(tmp_path / "out"))
    fal_emulator.inject(Fault("submit", kind, match=unique))  # type: ignore[arg-type]
    before = calls(fal_emulator)
    with pytest.raises(SubmitOutcomeUnknown, match="outcome unknown, possibly billed") as info:
        gen(request, options)
    assert info.value.error_type == OUTCOME_UNKNOWN
    assert "malformed request id" in str(info.value)
    accepted, posts, polls, streams, strays = calls(fal_emulator)
    assert (accepted, posts) == (before[0] + 1, before[1] + 1)
    assert (polls, streams, strays) == before[2:]
    intent = read_intent(request)
    assert intent is not None and intent.state == "unknown" and intent.handle is None

    # the id fal gave it appears in no file name: not in the output, the result store, /tmp
    rid = emulated_id(fal_emulator, unique)
    assert paths_naming(tmp_path, rid) == [] and paths_naming(storage, rid) == []
    assert not list(Path("/tmp").glob(f"*{rid}*"))

    # a plain re-run pays nothing more
    with pytest.raises(SubmitOutcomeUnknown, match="outcome unknown, possibly billed"):
        gen(request, options)
    assert calls(fal_emulator)[:2] == (accepted, posts)


def test_flow_rows_answered_with_one_request_id_are_both_refused(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    """fal answers the second row with the first row's id (well formed, but not its own): the
    run's ledger fails both rows, and no image is written under the second row's name."""
    out = tmp_path / "out"
    first, second = req(f"{unique}-1"), req(f"{unique}-2", num_images=2)
    fal_emulator.inject(Fault("submit", "id_other", match=f"{unique}-2"))
    accepted = fal_emulator.stats["accepted"]
    results = gen_two(first, second, GenerationOptions(output_dir=str(out)))
    assert fal_emulator.stats["accepted"] == accepted + 2
    assert isinstance(results[0], GenerationResult)  # the first row had finished
    assert isinstance(results[1], DuplicateRequestId)
    assert results[1].request_id == results[0].handle.request_id
    second_id = emulated_id(fal_emulator, f"{unique}-2")
    assert second_id != results[0].handle.request_id
    # only the first row's one image is on disk: nothing of the second row's two
    assert len([p for p in out.rglob("*") if p.is_file()]) == 1
