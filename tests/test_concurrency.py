"""The cap on fal requests in flight: a Prefect global concurrency limit, or the local fallback."""

from __future__ import annotations

import contextvars
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from prefect_gptimage.flows.batch import batch_to_s3
from prefect_gptimage.tasks.concurrency import fal_request_slot, forget_lookups
from prefect_gptimage.testing import FalEmulator, RequestInfo
from prefect_gptimage.testing.faults import Fault


def max_overlap(emulator: FalEmulator, marker: str, running: bool = False) -> int:
    """Most of our requests alive at fal at once (submitted, or with ``running`` started, and
    not yet completed)."""
    events = []
    for info in emulator.requests():
        if marker in str(info.arguments.get("prompt", "")):
            assert info.completed_at is not None and info.started_at is not None
            begin = info.started_at if running else info.submitted_at
            events += [(begin, 1), (info.completed_at, -1)]
    alive = peak = 0
    for _, delta in sorted(events):
        alive += delta
        peak = max(peak, alive)
    return peak


def prompts(tmp_path: Path, unique: str, n: int) -> str:
    path = tmp_path / "p.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"tile {i} {unique}", "quality": "low"}) + "\n" for i in range(n)
        )
    )
    return str(path)


@pytest.fixture
def global_limit() -> Iterator[str]:
    name = "fal-gpt-image"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=2))
    forget_lookups()
    yield name
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(name)
    forget_lookups()


def test_global_limit_caps_requests_in_flight(
    fal_emulator: FalEmulator, global_limit: str, unique: str, tmp_path: Path
) -> None:
    # long enough to overlap on a loaded machine, where taking a slot on the API takes seconds
    fal_emulator.set_latency(4.0)
    with fal_request_slot() as slot:
        assert slot == f"global:{global_limit}"
    batch_to_s3(
        prompt_file=prompts(tmp_path, unique, 6), concurrency=6, output_dir=str(tmp_path / "o")
    )
    assert max_overlap(fal_emulator, unique) == 2


def test_local_cap_without_a_global_limit(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_GPTIMAGE_LOCAL_CONCURRENCY", "3")
    forget_lookups()
    fal_emulator.set_latency(1.0)
    with fal_request_slot() as slot:
        assert slot == "local:3"
    batch_to_s3(
        prompt_file=prompts(tmp_path, unique, 7), concurrency=7, output_dir=str(tmp_path / "o")
    )
    assert max_overlap(fal_emulator, unique) == 3


def test_lookahead_queues_at_fal_without_running_more_than_the_cap(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cap is the account's limit (2): 2 more wait in fal's queue, never 3 running."""
    monkeypatch.setenv("PREFECT_GPTIMAGE_LOCAL_CONCURRENCY", "2")
    forget_lookups()
    limit = fal_emulator.concurrency_limit
    fal_emulator.configure(latency=0.4, concurrency_limit=2)
    try:
        with fal_request_slot(lookahead=2) as slot:
            assert slot == "local:2+2"
        summary = batch_to_s3(
            prompt_file=prompts(tmp_path, unique, 8),
            concurrency=2,
            lookahead=2,
            output_dir=str(tmp_path / "o"),
        )
    finally:
        fal_emulator.set_concurrency_limit(limit)
    assert len(summary.images) == 8 and not summary.failures
    assert max_overlap(fal_emulator, unique) == 4  # 2 running + 2 queued at fal
    assert max_overlap(fal_emulator, unique, running=True) == 2


def test_a_slot_lease_shorter_than_the_servers_minimum_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Prefect server answers 422 to a lease under 60 s: the setting refuses it up front."""
    from pydantic import ValidationError

    from prefect_gptimage.settings import get_settings

    monkeypatch.setenv("PREFECT_GPTIMAGE_SLOT_LEASE", "30")
    with pytest.raises(ValidationError, match="slot_lease"):
        get_settings()
    monkeypatch.setenv("PREFECT_GPTIMAGE_SLOT_LEASE", "90")
    assert get_settings().slot_lease == 90


def test_a_missing_global_limit_fails_at_once_not_after_the_retry_budget(
    unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A limit that does not exist is a permanent answer (not the server being away): taking a
    slot of it fails at once, the retry budget unspent. The budget is 600 s here, so "at once"
    can be a deadline a loaded machine meets (120 s) and still far from the budget."""
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError

    from prefect_gptimage.tasks.concurrency import global_slot

    monkeypatch.setenv("PREFECT_GPTIMAGE_RETRY_BUDGET", "600")
    started = time.monotonic()
    with (
        pytest.raises(ConcurrencySlotAcquisitionError, match="must be created"),
        global_slot(f"no-such-limit-{unique}"),
    ):
        pass  # pragma: no cover - never entered
    assert time.monotonic() - started < 120


def test_a_slot_is_given_back_when_fal_completes_not_after_the_result_is_read(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cap 1, two rows, and no result can be read (fal answers 202 to every result GET) until
    the test allows it: the second row is submitted once the first completed at fal, while its
    result is still being read, and never alongside it. The order comes from events, not from
    how fast a loaded machine is: results become readable only after fal accepted the second
    row, so with a slot held until the result was read the second row would never be sent."""
    monkeypatch.setenv("PREFECT_GPTIMAGE_LOCAL_CONCURRENCY", "1")
    monkeypatch.setenv("PREFECT_GPTIMAGE_RETRY_BUDGET", "600")  # the result GET keeps trying
    forget_lookups()
    fal_emulator.set_latency(0.5)
    unreadable = fal_emulator.inject(Fault("result", "stuck", count=None, match=unique))

    def ours() -> list[RequestInfo]:
        mine = (r for r in fal_emulator.requests() if unique in str(r.arguments.get("prompt")))
        return sorted(mine, key=lambda r: r.submitted_at)

    errors: list[BaseException] = []

    def run() -> None:
        try:
            batch_to_s3(
                prompt_file=prompts(tmp_path, unique, 2),
                concurrency=1,
                output_dir=str(tmp_path / "o"),
            )
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    batch = threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True)
    batch.start()
    try:
        deadline = time.monotonic() + 180
        # both: the second row at fal, and a result asked for and refused (not read yet)
        while len(ours()) < 2 or unreadable.fired < 1:
            assert batch.is_alive(), f"the batch ended with one row at fal: {errors}"
            assert time.monotonic() < deadline, "the second row was never submitted"
            time.sleep(0.05)
    finally:
        fal_emulator.clear_faults()  # results readable from now on
        batch.join(240)
    assert not batch.is_alive() and not errors, errors
    first, second = ours()
    assert first.completed_at is not None
    assert second.submitted_at >= first.completed_at  # the cap: never two at fal
