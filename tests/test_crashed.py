"""A worker that dies with its flow run: the run is marked CRASHED, and a re-run is safe
(issue 18, "crashed workers").

Prefect marks such a run through flow-run heartbeats (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``,
formerly ``PREFECT_RUNNER_HEARTBEAT_FREQUENCY``; 30 s at least) and an automation that sets
CRASHED when a run's heartbeats stop (Prefect's "detect zombie flows" recipe, shown in
docs/troubleshooting.md). Here a CLI batch reports to a real ``prefect server start`` (its
triggers service evaluates the automation) with heartbeats every 30 s; once fal accepted part
of it, the CLI is killed with SIGKILL (what a machine crash does to it: no handler runs). The
automation, created through the public client, must mark the run CRASHED; a re-run then pays
only for what fal never accepted.
"""

from __future__ import annotations

import json
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from conftest import run_cli_process, start_cli_process
from real_services import PrefectServer
from test_signals import cli_env

from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

ROWS = 6
HEARTBEAT_S = 30  # Prefect's least
WITHIN_S = 45  # the automation's window: a run whose heartbeats stop is crashed after this
#: From the kill to CRASHED: the window, plus a heartbeat's period, plus the server's proactive
#: evaluation, plus room for a loaded machine
CRASHED_WITHIN_S = 300


def zombie_automation(name: str) -> Any:
    """Prefect's documented automation: a flow run whose heartbeats stop is marked CRASHED."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=name,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=WITHIN_S),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message="Flow run marked as crashed due to missing heartbeats.",
            )
        ],
    )


def _running_run(prompt_file: Path, deadline: float) -> UUID:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            for run in client.read_flow_runs():
                running = run.state is not None and run.state.is_running()
                if running and run.parameters.get("prompt_file") == str(prompt_file):
                    return run.id
            time.sleep(0.5)
    raise AssertionError("the batch's flow run never showed up RUNNING")


def _state(flow_run_id: UUID) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


@pytest.mark.timeout(1200)  # a real server, a kill, the automation's window, a re-run
def test_a_killed_batch_is_marked_crashed_and_a_rerun_pays_only_what_was_never_accepted(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    prefect_server: PrefectServer,
    prefect_harness: dict[str, Any],
    unique: str,
    tmp_path: Path,
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    limit = fal_emulator.concurrency_limit
    fal_emulator.configure(latency=20.0, concurrency_limit=2)
    path = tmp_path / "rows.jsonl"
    prompts = [f"crashed row {i} {unique}" for i in range(ROWS)]
    path.write_text("".join(json.dumps({"prompt": p, "quality": "low"}) + "\n" for p in prompts))
    env = {
        **cli_env(prefect_harness, tmp_path),
        "PREFECT_API_URL": prefect_server.api_url,
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
    }
    # no look-ahead: once two are at fal, nothing is mid-submit for 20 s (a kill then leaves no
    # submit whose outcome is unknown, which a re-run would rightly refuse to pay again)
    args = ["batch", str(path), "--bucket", s3_bucket, "--concurrency", "2", "--lookahead", "0"]
    args.append("--json")
    accepted = fal_emulator.stats["accepted"]
    duplicates = fal_emulator.stats["duplicate_submits"]
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
            automation_id = zombie_automation(f"crash zombie runs {unique}").create().id
            proc = start_cli_process(args, env)
            try:
                deadline = time.monotonic() + 300
                while fal_emulator.stats["accepted"] - accepted < 2:
                    assert proc.poll() is None, proc.communicate()[1][-3000:]
                    assert time.monotonic() < deadline, "nothing reached fal in 300 s"
                    time.sleep(0.1)
                flow_run_id = _running_run(path, deadline)
                proc.send_signal(signal.SIGKILL)  # a machine crash: no handler, no summary
                proc.wait(60)
                killed = time.monotonic()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            paid = fal_emulator.stats["accepted"] - accepted
            assert 0 < paid < ROWS
            assert _state(flow_run_id).is_running()  # nothing told the server

            state = _state(flow_run_id)
            while not state.is_crashed() and time.monotonic() - killed < CRASHED_WITHIN_S:
                time.sleep(2)
                state = _state(flow_run_id)
            took = time.monotonic() - killed
            print(f"CRASHED {took:.0f}s after the kill; {paid} request(s) accepted before it")
            assert state.is_crashed(), f"still {state.type.value} {took:.0f}s after the kill"
            assert "missing heartbeats" in (state.message or "")

            fal_emulator.configure(latency=0.5, concurrency_limit=8)
            again = run_cli_process(args, env)
            from prefect.automations import Automation

            Automation.read(id=automation_id).delete()
    finally:
        fal_emulator.configure(concurrency_limit=limit)

    assert again.returncode == 0, again.stderr[-4000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["staged"] == ROWS
    assert fal_emulator.stats["duplicate_submits"] - duplicates == 0
    assert fal_emulator.stats["accepted"] - accepted == ROWS  # each row paid for once in all
    assert summary["submitted"] == ROWS - paid  # the re-run paid only what was never accepted
