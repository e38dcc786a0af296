"""Cancelling a batch through Prefect is a stop (issue 18, item 1).

The CLI runs as a user runs it (a subprocess) against the session's Prefect API; once fal has
accepted the first wave, the flow run is cancelled through the API as ``prefect flow-run cancel``
does. From then on at most one submit may still reach fal, requests waiting in fal's queue are
cancelled there, the run ends CANCELLED with its summary (one line, no traceback), and a re-run
pays only for what was never paid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

ROWS = 10
CAP = 4  # --concurrency: the first wave
FAL_SLOTS = 2  # the emulated account runs two at once: the rest of the wave waits in fal's queue


def _env(harness: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FAL_KEY": "cancel-key-id:cancel-key-secret",
        "PREFECT_API_URL": str(harness["api_url"]),
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
        "PREFECT_GPTIMAGE_OUTPUT_DIR": str(tmp_path / "images"),
    }


def _flow_run_of(prompt_file: Path, deadline: float) -> UUID:
    """The id of the running batch flow run of ``prompt_file`` (read through the API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState

    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type={"any_": ["RUNNING"]})  # type: ignore[arg-type]
                )
            )
            for run in runs:
                if run.parameters.get("prompt_file") == str(prompt_file):
                    return run.id
            time.sleep(0.2)
    raise AssertionError("the batch's flow run never showed up RUNNING")


def _cancel(flow_run_id: UUID) -> None:
    """What ``prefect flow-run cancel ID`` does: propose CANCELLING through the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import State, StateType

    with get_client(sync_client=True) as client:
        result = client.set_flow_run_state(flow_run_id, State(type=StateType.CANCELLING))
    assert result.status.value == "ACCEPT", result


def _final_state(flow_run_id: UUID) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def test_a_cancel_through_prefect_stops_paying_and_a_rerun_pays_only_the_rest(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    prefect_harness: dict[str, Any],
    unique: str,
    tmp_path: Path,
) -> None:
    fal_emulator.configure(latency=6.0, concurrency_limit=FAL_SLOTS)
    path = tmp_path / "rows.jsonl"
    prompts = [f"cancel row {i} {unique}" for i in range(ROWS)]
    path.write_text("".join(json.dumps({"prompt": p, "quality": "low"}) + "\n" for p in prompts))
    env = _env(prefect_harness, tmp_path)
    args = [sys.executable, "-m", "prefect_gptimage.cli", "batch", str(path)]
    args += ["--bucket", s3_bucket, "--concurrency", str(CAP), "--json"]
    accepted, cancelled = fal_emulator.stats["accepted"], fal_emulator.stats["cancelled"]

    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while fal_emulator.stats["accepted"] - accepted < CAP and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        assert fal_emulator.stats["accepted"] - accepted == CAP, "the first wave never reached fal"
        flow_run_id = _flow_run_of(path, deadline)
        cancel_sent = time.time()
        _cancel(flow_run_id)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    ours = [r for r in fal_emulator.requests() if r.arguments.get("prompt") in prompts]
    late = [r for r in ours if r.submitted_at > cancel_sent]
    print(f"cancel: exit {proc.returncode}, {len(ours)} submit(s), {len(late)} after the cancel")
    assert len(late) <= 1, [(r.request_id, r.submitted_at - cancel_sent) for r in late]
    # the requests waiting in fal's queue were cancelled there, before they ran
    withdrawn = [r for r in ours if r.error_type == "client_cancelled"]
    assert fal_emulator.stats["cancelled"] - cancelled == len(withdrawn) >= 1
    assert all(r.started_at is None for r in withdrawn), "a running request was cancelled"
    # one line, no traceback, and the summary as the last line
    assert proc.returncode == 1, stderr[-4000:]
    assert "Traceback" not in stderr, stderr[-4000:]
    assert "cancelled" in stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert len(summary["failures"]) + len(summary["images"]) == ROWS
    assert summary["manifest_uri"]
    assert _final_state(flow_run_id).type.value == "CANCELLED"

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)

    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["staged"] == ROWS
    # paid: every request fal accepted and did not drop from its queue; once per row in all
    ours = [r for r in fal_emulator.requests() if r.arguments.get("prompt") in prompts]
    paid = Counter(r.arguments["prompt"] for r in ours if r.error_type != "client_cancelled")
    assert paid == Counter(prompts), paid
