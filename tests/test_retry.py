"""Retry decided in one place: the decision table row by row, and whole commands under outages.

The outages are real: a fal host nobody listens on, and the bundled emulator refusing every status
call with a json-style 503. The CLI runs as a user runs it (a subprocess, configured only by the
environment), with a short retry budget so the suite stays fast; the README gives the default.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, SSLError
from conftest import run_cli_process
from real_services import free_port

from prefect_gptimage.errors import (
    FalRequestFailed,
    PermanentFalError,
    SubmitOutcomeUnknown,
    TransientFalError,
)
from prefect_gptimage.retry import (
    fal_http_error,
    fal_transport_error,
    is_transient_s3_error,
    is_transient_status,
    resubmit_reason,
)
from prefect_gptimage.testing import FalEmulator, Fault

BUDGET = 4.0


@pytest.mark.parametrize(
    ("status", "headers", "media", "transient"),
    [
        (408, {}, False, True),
        (409, {}, False, True),
        (425, {}, True, True),
        (429, {}, False, True),
        (500, {}, False, True),
        (502, {}, False, True),
        (503, {}, True, True),
        (504, {}, False, True),
        (504, {"X-Fal-Request-Timeout-Type": "user"}, False, False),
        (503, {"X-Fal-Retryable": "false"}, False, False),
        (400, {"X-Fal-Retryable": "true"}, False, True),
        (401, {}, False, False),
        (403, {}, True, False),
        (404, {}, False, False),
        (404, {}, True, False),
        (410, {}, True, False),
        (422, {}, False, False),
    ],
)
def test_status_table(status: int, headers: dict[str, str], media: bool, transient: bool) -> None:
    assert is_transient_status(status, headers, media=media) is transient


def test_fal_error_carries_fals_message_and_host() -> None:
    err = fal_http_error(
        503,
        {"x-fal-request-id": "r-1"},
        {"detail": "no runner", "error_type": "runner_scheduling_failure"},
        operation="status",
        host="queue.fal.run",
    )
    assert isinstance(err, TransientFalError) and err.request_id == "r-1"
    assert str(err) == (
        "fal status at queue.fal.run failed with HTTP 503 (runner_scheduling_failure): no runner"
    )
    refused = fal_http_error(
        422, {}, {"detail": [{"loc": ["body", "prompt"], "msg": "bad"}]}, operation="submit"
    )
    assert isinstance(refused, PermanentFalError) and str(refused).endswith("prompt: bad")


@pytest.mark.parametrize(
    "exc",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("x")],
)
def test_transport_errors_are_transient(exc: httpx.TransportError) -> None:
    err = fal_transport_error(exc, "status", "queue.fal.run")
    assert err.transient and "queue.fal.run" in str(err)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ClientError({"Error": {"Code": "SlowDown"}}, "PutObject"), True),
        (
            ClientError({"Error": {}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject"),
            True,
        ),
        (
            ClientError(
                {"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
                "PutObject",
            ),
            False,
        ),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (SSLError(endpoint_url="https://x", error="bad cert"), False),
    ],
)
def test_s3_rows(exc: BaseException, transient: bool) -> None:
    assert is_transient_s3_error(exc) is transient


def test_resubmit_only_what_fal_did_not_bill() -> None:
    assert resubmit_reason(FalRequestFailed("x", status_code=500)) is not None
    assert resubmit_reason(FalRequestFailed("x", status_code=422)) is None
    assert resubmit_reason(PermanentFalError("gone", status_code=404)) is not None
    assert resubmit_reason(SubmitOutcomeUnknown("?")) is None
    assert resubmit_reason(TransientFalError("503", status_code=503)) is None


def _cli(args: list[str], harness: dict[str, Any], tmp_path: Path, **env: str) -> tuple[Any, float]:
    full = {
        **os.environ,
        "FAL_KEY": "outage-key-id:outage-secret",
        "PREFECT_API_URL": str(harness["api_url"]),
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
        "PREFECT_GPTIMAGE_OUTPUT_DIR": str(tmp_path / "images"),
        "PREFECT_GPTIMAGE_RETRY_BUDGET": str(BUDGET),
        **env,
    }
    started = time.monotonic()
    proc = run_cli_process(args, full)
    return proc, time.monotonic() - started


def _one_clear_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_generate_with_fal_unreachable_fails_in_budget_with_one_line(
    prefect_harness: dict[str, Any], unique: str, tmp_path: Path
) -> None:
    host = f"127.0.0.1:{free_port()}"  # nobody listens there
    proc, elapsed = _cli(
        ["generate", f"a cat {unique}", "--quality", "low"],
        prefect_harness,
        tmp_path,
        FAL_QUEUE_RUN_HOST=host,
        FAL_RUN_HOST=host,
    )
    assert proc.returncode == 1
    line = _one_clear_line(proc.stderr)
    assert "cannot connect" in line and host.split(":")[0] in line, line
    # one layer retries, for the budget: a handful of attempts (backoff from 0.25 s, capped at
    # 1 s by the suite), not layers multiplying them; the process ends soon after (Python and
    # Prefect start up slowly on a loaded machine, hence the generous deadline)
    attempts = re.search(r"gave up after (\d+) attempts", line)
    assert attempts is not None, line
    assert 2 <= int(attempts.group(1)) <= 2 * (BUDGET / 0.25), line
    assert elapsed < BUDGET + 120, elapsed


def test_generate_with_every_status_refused_pays_once_and_fails_in_budget(
    fal_emulator: FalEmulator, prefect_harness: dict[str, Any], unique: str, tmp_path: Path
) -> None:
    accepted, statuses = fal_emulator.stats["accepted"], fal_emulator.stats["status"]
    fal_emulator.inject(Fault("status", "503_json", count=None))
    proc, elapsed = _cli(
        ["generate", f"a dog {unique}", "--quality", "low"], prefect_harness, tmp_path
    )
    assert proc.returncode == 1
    line = _one_clear_line(proc.stderr)
    assert "HTTP 503" in line and "gave up after" in line, line
    assert fal_emulator.stats["accepted"] == accepted + 1  # one submit, never a second
    calls = fal_emulator.stats["status"] - statuses
    # backoff from 0.25 s doubling to 8 s: a handful of calls in the budget, not 5 x 5 x 6
    assert 2 <= calls <= 8, calls
    assert elapsed < BUDGET + 120, elapsed  # ends soon: the budget, then a generous deadline
