"""Submit intents against the emulator: a submit that may have been billed is never paid again
by a plain re-run, whether its answer was lost on the wire or its process was killed."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import flow

from prefect_gptimage.errors import PermanentFalError, SubmitOutcomeUnknown
from prefect_gptimage.schemas import GenerationResult, GptImageRequest, RequestHandle
from prefect_gptimage.tasks.cache import is_submit_cached
from prefect_gptimage.tasks.generate import generate_images
from prefect_gptimage.tasks.intents import (
    OUTCOME_UNKNOWN,
    intent_key,
    read_intent,
    unresolved_intent,
    write_intent,
)
from prefect_gptimage.tasks.options import GenerationOptions
from prefect_gptimage.tasks.queue import submit_request
from prefect_gptimage.testing import FalEmulator, Fault


def req(unique: str, **kw: object) -> GptImageRequest:
    return GptImageRequest(prompt=f"a paper boat {unique}", quality="low", **kw)  # type: ignore[arg-type]


@flow
def gen(request: GptImageRequest, options: GenerationOptions) -> GenerationResult:
    return generate_images(request, options)


def counts(emulator: FalEmulator) -> tuple[int, int, int]:
    stats = emulator.stats
    return stats["submit"], stats["accepted"], stats["duplicate_submits"]


@pytest.fixture
def task_log() -> Iterator[list[str]]:
    """Messages of the task-run loggers (Prefect's loggers do not propagate to caplog)."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, logger = Keep(level=logging.INFO), logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def test_intent_round_trip_in_the_result_store(unique: str) -> None:
    request = req(unique)
    assert read_intent(request) is None
    assert intent_key(request) != intent_key(request, variant=1)
    write_intent(request, 0, "submitting")
    intent = read_intent(request)
    assert intent is not None and intent.state == "submitting" and intent.pid == os.getpid()
    assert unresolved_intent(request) is not None and unresolved_intent(request, 1) is None
    write_intent(request, 0, "not_submitted")
    assert unresolved_intent(request) is None


def test_dropped_submit_is_reported_and_not_paid_again(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    """Item 2: fal accepted the request, the answer was lost: outcome unknown, possibly billed."""
    request, options = req(unique), GenerationOptions(output_dir=str(tmp_path))
    fal_emulator.inject(Fault("submit", "drop_after_accept", count=1, match=unique))
    submits, accepted, duplicates = counts(fal_emulator)
    with pytest.raises(SubmitOutcomeUnknown, match="outcome unknown, possibly billed") as first:
        gen(request, options)
    assert first.value.error_type == OUTCOME_UNKNOWN
    assert counts(fal_emulator) == (submits + 1, accepted + 1, duplicates)  # sent once, no retry
    intent = read_intent(request)
    assert intent is not None and intent.state == "unknown"

    # a plain re-run sends nothing and says why
    for _ in range(2):
        with pytest.raises(SubmitOutcomeUnknown, match="outcome unknown, possibly billed") as again:
            gen(request, options)
        assert "--resubmit-unknown" in str(again.value) and "no usable answer" in str(again.value)
        assert counts(fal_emulator) == (submits + 1, accepted + 1, duplicates)

    # asked to: submitted once, then cached like any other request
    result = gen(request, options.model_copy(update={"resubmit_unknown": True}))
    assert len(result.images) == 1 and not result.from_cache
    assert counts(fal_emulator) == (submits + 2, accepted + 2, duplicates + 1)
    assert gen(request, options).from_cache
    assert counts(fal_emulator)[:2] == (submits + 2, accepted + 2)


def test_refresh_cache_also_resubmits_an_unknown_outcome(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    request, options = req(unique), GenerationOptions(output_dir=str(tmp_path))
    fal_emulator.inject(Fault("submit", "drop_after_accept", count=1, match=unique))
    with pytest.raises(SubmitOutcomeUnknown):
        gen(request, options)
    accepted = fal_emulator.stats["accepted"]
    result = gen(request, options.model_copy(update={"refresh_cache": True}))
    assert len(result.images) == 1 and fal_emulator.stats["accepted"] == accepted + 1


def test_a_submit_refused_by_fal_is_submitted_by_a_re_run(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    """A 4xx at submit proves nothing was enqueued: the intent does not block the next run."""
    request, options = req(unique), GenerationOptions(output_dir=str(tmp_path))
    fal_emulator.inject(Fault("submit", "404", count=1, match=unique))
    accepted = fal_emulator.stats["accepted"]
    with pytest.raises(PermanentFalError):
        gen(request, options)
    assert fal_emulator.stats["accepted"] == accepted
    intent = read_intent(request)
    assert intent is not None and intent.state == "not_submitted"
    assert len(gen(request, options).images) == 1
    assert fal_emulator.stats["accepted"] == accepted + 1


def test_recorded_handle_is_resumed_when_the_cache_record_is_missing(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    """A crash after fal's answer was recorded in the intent, before the task's cache record."""
    request = req(unique)

    @flow
    def body_only() -> RequestHandle:
        return submit_request.fn(request)  # the task's body alone: no cache record is written

    handle = body_only()
    assert not is_submit_cached(request)
    intent = read_intent(request)
    assert intent is not None and intent.state == "submitted" and intent.handle == handle
    submits = fal_emulator.stats["submit"]
    result = gen(request, GenerationOptions(output_dir=str(tmp_path)))
    assert result.handle.request_id == handle.request_id and len(result.images) == 1
    assert fal_emulator.stats["submit"] == submits


def test_expired_result_is_paid_twice_and_said_so(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path, task_log: list[str]
) -> None:
    """Item 4: kept (the README documents it), reported as 'paid twice'; or off."""
    options = GenerationOptions(output_dir=str(tmp_path))
    accepted = fal_emulator.stats["accepted"]
    fal_emulator.inject(Fault("result", "404", count=1, match=unique))
    result = gen(req(unique), options)
    assert len(result.images) == 1
    assert fal_emulator.stats["accepted"] == accepted + 2
    assert any("paid twice: fal expired the result" in m for m in task_log), task_log

    fal_emulator.inject(Fault("result", "404", count=1, match=unique))
    with pytest.raises(PermanentFalError, match="not submitted again"):
        gen(req(unique, num_images=2), options.model_copy(update={"resubmit_expired": False}))
    assert fal_emulator.stats["accepted"] == accepted + 3


# --- kill -9 between fal accepting a submit and its answer being stored --------------------------

_KILLED_RUN = """
import sys
from prefect import flow
from prefect_gptimage.schemas import GptImageRequest
from prefect_gptimage.tasks.generate import generate_images
from prefect_gptimage.tasks.options import GenerationOptions

@flow
def one(prompt: str, out: str) -> None:
    options = GenerationOptions(output_dir=out)
    generate_images(GptImageRequest(prompt=prompt, quality="low"), options)

one(sys.argv[1], sys.argv[2])
"""


def _run_and_kill_on_accept(
    emulator: FalEmulator, harness: dict[str, Any], prompt: str, out: Path
) -> None:
    env = {
        **os.environ,  # the emulator's FAL_QUEUE_RUN_HOST, SSL_CERT_FILE, ... and FAL_KEY
        "PREFECT_API_URL": str(harness["api_url"]),
        "PREFECT_LOCAL_STORAGE_PATH": str(harness["storage"]),  # the test process's records
    }
    accepted = emulator.stats["accepted"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, prompt, str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while emulator.stats["accepted"] == accepted:
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode()[-3000:] if proc.stderr else ""
                pytest.fail(f"the run ended (or stalled) before fal accepted its submit: {err}")
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("answer_delay", [3.0, 1.0, 0.0])
def test_kill_after_fal_accepts_resumes_without_paying_twice(
    fal_emulator: FalEmulator,
    prefect_harness: dict[str, Any],
    unique: str,
    tmp_path: Path,
    answer_delay: float,
) -> None:
    """Item 1: the kill lands after fal enqueued the request (its counter moved), and, with an
    answer delay, surely before the answer reached the process: an intent without a handle."""
    if answer_delay:
        fal_emulator.inject(Fault("submit", "slow", delay=answer_delay, match=unique))
    request = req(unique)
    _, accepted, duplicates = counts(fal_emulator)
    _run_and_kill_on_accept(fal_emulator, prefect_harness, request.prompt, tmp_path / "killed")
    assert fal_emulator.stats["accepted"] == accepted + 1

    options = GenerationOptions(output_dir=str(tmp_path / "resumed"))
    try:
        result = gen(request, options)
    except SubmitOutcomeUnknown as exc:  # the kill came before the answer was stored
        assert "outcome unknown, possibly billed" in str(exc) and "pid" in str(exc)
    else:  # the kill came after: the stored handle was resumed
        assert len(result.images) == 1
        assert answer_delay == pytest.approx(0.0)
    _, now_accepted, now_duplicates = counts(fal_emulator)
    assert (now_accepted, now_duplicates) == (accepted + 1, duplicates)  # 0 duplicate submits
