"""Cancelling a DEPLOYMENT run of the batch flow through Prefect is a stop (issue 18, item 1).

The batch deployment is created on a process work pool of the session's Prefect API (a real
server) and run by ``prefect worker start --type process``; a flow run of it is created with the
public client, and once fal has accepted the first wave the run is cancelled through the API as
``prefect flow-run cancel`` does. The worker then tells the flow-run process to stop (Prefect's
control channel, then SIGTERM). From then on at most one
submit may still reach fal, requests waiting in fal's queue are cancelled there, the run ends
CANCELLED through Prefect's own cancel, its logs with one summary line and no traceback, its
manifest and results table are written, and a second deployment run pays only for the rows never
paid.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.states import Cancelling
from test_deployments import (
    PROCESS_TIMEOUT,
    clean_env,
    deploy_to_process_pool,
    final_state,
    flow_run_logs,
    start_worker,
    stop,
    tail,
    wait_for,
)

from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

ROWS = 10
CAP = 4  # the deployment's ``concurrency``: the first wave
FAL_SLOTS = 2  # the emulated account runs two at once: the rest of the wave waits in fal's queue
#: Generous: the runner starts a fresh process per flow run (it imports Prefect: slow under load)
FINAL_STATE_TIMEOUT = 180.0


#: The run's own last line: its summary, logged as it hands the cancel back to Prefect
CANCELLED_LINE = "cancelled: "
#: Logs reach the API in batches, the last ones as the process exits: waited for up to this long
LOGS_TIMEOUT = 120.0


def _run(deployment_id: UUID) -> FlowRun:
    """A new flow run of the deployment, not waited for (what ``prefect deployment run``
    does)."""
    flow_run = run_deployment(deployment_id, timeout=0)
    assert isinstance(flow_run, FlowRun)
    return flow_run


def _cancel(flow_run_id: UUID) -> None:
    """What ``prefect flow-run cancel ID`` does: propose CANCELLING through the API."""
    with get_client(sync_client=True) as client:
        result = client.set_flow_run_state(flow_run_id, Cancelling())
    assert result.status.value == "ACCEPT", result


def _logs_once_ended(flow_run_id: UUID) -> list[str]:
    """The flow run's log messages once its last one (its summary line) has reached the API;
    what there is after :data:`LOGS_TIMEOUT`."""
    deadline = time.monotonic() + LOGS_TIMEOUT
    while True:
        messages = flow_run_logs(flow_run_id)
        if any(m.startswith(CANCELLED_LINE) for m in messages):
            return messages
        if time.monotonic() > deadline:
            return messages
        time.sleep(1.0)


def _artifact_keys(flow_run_id: UUID) -> set[str]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key for a in artifacts if a.key}


@pytest.mark.timeout(900)  # a worker, then two flow runs, each in a fresh process
def test_cancelling_a_deployment_run_stops_paying_and_a_rerun_pays_only_the_rest(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    prefect_harness: dict[str, Any],
    unique: str,
    tmp_path: Path,
) -> None:
    fal_emulator.configure(latency=6.0, concurrency_limit=FAL_SLOTS)
    prompt_file = tmp_path / "rows.jsonl"
    prompts = [f"deployment cancel row {i} {unique}" for i in range(ROWS)]
    prompt_file.write_text(
        "".join(json.dumps({"prompt": p, "quality": "low"}) + "\n" for p in prompts)
    )
    api_url = str(prefect_harness["api_url"])
    prefix = f"worker-cancel-{unique}"
    out = tmp_path / "out"
    log = tmp_path / "worker.log"
    env = clean_env(
        **local_s3.env(),
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(tmp_path / "worker-home"),
        PREFECT_LOCAL_STORAGE_PATH=str(tmp_path / "results"),
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        PREFECT_GPTIMAGE_OUTPUT_DIR=str(out),
    )
    assert "FAL_QUEUE_RUN_HOST" in env and "SSL_CERT_FILE" in env and "FAL_KEY" in env
    pool = f"gptimage-cancel-{unique}"
    parameters = {"prompt_file": str(prompt_file), "bucket": s3_bucket, "prefix": prefix}
    deployment_id = deploy_to_process_pool(
        pool, f"cancel-{unique}", {**parameters, "concurrency": CAP}
    )
    proc = start_worker(pool, env, tmp_path, log)
    try:
        # this test's requests only: the session's emulator serves the other tests of this worker
        def submitted() -> list[Any]:
            return [r for r in fal_emulator.requests() if r.arguments.get("prompt") in prompts]

        first = _run(deployment_id)

        wait_for(
            "the first wave accepted at fal",
            lambda: len(submitted()) >= CAP or None,
            proc,
            log,
            PROCESS_TIMEOUT,
        )
        assert len(submitted()) == CAP, "more than the first wave"
        cancel_sent = time.time()
        _cancel(first.id)
        state = final_state(first.id, proc, log, FINAL_STATE_TIMEOUT)
        print(f"first run: {state.type.value} {state.message!r}")

        ours = submitted()
        late = [r for r in ours if r.submitted_at > cancel_sent]
        print(f"deployment cancel: {len(ours)} submit(s), {len(late)} after the cancel")
        assert len(late) <= 1, [(r.request_id, r.submitted_at - cancel_sent) for r in late]
        # the requests waiting in fal's queue were cancelled there (the emulator marks each
        # request its cancel call reached), before they ran
        withdrawn = [r for r in ours if r.error_type == "client_cancelled"]
        assert len(withdrawn) >= 1, [(r.request_id, r.error_type) for r in ours]
        assert all(r.started_at is None for r in withdrawn), "a running request was cancelled"
        assert state.type.value == "CANCELLED", f"{state}\n{tail(log)}"
        messages = _logs_once_ended(first.id)
        assert messages, "the flow run's logs never reached the API"
        # one line says what the cancel left (Prefect's cancel ended the run: its state message
        # is Prefect's), and nothing logs a traceback
        summary = [m for m in messages if m.startswith(CANCELLED_LINE)]
        assert len(summary) == 1 and "re-run" in summary[0], "\n".join(messages)[-4000:]
        assert not [m for m in messages if "Traceback" in m], "\n".join(messages)[-4000:]
        # the summary: the run's results table, and its manifest staged to S3 and kept locally
        assert any(k.endswith("-results") for k in _artifact_keys(first.id)), _artifact_keys(
            first.id
        )
        s3 = local_s3.client()
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
        assert [k for k in keys if k.startswith(f"{prefix}/manifests/")], keys
        assert any(out.rglob("manifest.jsonl")), list(out.rglob("*"))

        second = _run(deployment_id)
        again = final_state(second.id, proc, log, FINAL_STATE_TIMEOUT)
        assert again.is_completed(), f"{again}\n{tail(log)}"
    finally:
        stop(proc)

    # paid: every request fal accepted and did not drop from its queue; once per row in all
    ours = [r for r in fal_emulator.requests() if r.arguments.get("prompt") in prompts]
    paid = Counter(r.arguments["prompt"] for r in ours if r.error_type != "client_cancelled")
    assert paid == Counter(prompts), paid
