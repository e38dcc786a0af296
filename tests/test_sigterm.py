"""SIGTERM ends a batch of any size within 10 s (issue 18, "SIGTERM ends a batch of any size").

A worker or Kubernetes stops a run with SIGTERM, then kills it if it has not gone within its
grace period (Kubernetes' default: 30 s). Here a batch has far more rows in flight than fal
runs at once: 24 rows, a cap of 4 plus a look-ahead of 8, against an emulator that runs only 2
requests at a time for 60 s each, so most accepted requests sit in fal's queue and most rows
wait for a slot when the signal lands.

The product's bound is 10 s from the signal. The test allows 15 s: the 10 s, plus the start-up
slack of the test's own clock under load (the signal is sent from this process, and the CLI's
Python has to be scheduled to run its handler on a machine whose load is 6-15 on 2 cores).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli_process, start_cli_process
from test_signals import cli_env

from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

ROWS = 24
#: Seconds from the signal to the process's exit: the product's 10 s plus 5 s of slack under load
EXIT_DEADLINE_S = 15.0
#: accepted submits of this run before the signal: the cap and part of the look-ahead
ACCEPTED_BEFORE_SIGNAL = 6


@pytest.mark.timeout(900)  # two CLI runs, each importing Prefect
def test_sigterm_ends_a_large_batch_within_10_s_and_a_rerun_pays_nothing_twice(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    prefect_harness: dict[str, Any],
    unique: str,
    tmp_path: Path,
) -> None:
    limit = fal_emulator.concurrency_limit
    fal_emulator.configure(latency=60.0, concurrency_limit=2)
    try:
        _sigterm_then_rerun(fal_emulator, prefect_harness, s3_bucket, unique, tmp_path)
    finally:
        fal_emulator.configure(concurrency_limit=limit)


def _sigterm_then_rerun(
    fal_emulator: FalEmulator,
    prefect_harness: dict[str, Any],
    s3_bucket: str,
    unique: str,
    tmp_path: Path,
) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"sigterm row {i} {unique}", "quality": "low"}) + "\n"
            for i in range(ROWS)
        )
    )
    env = cli_env(prefect_harness, tmp_path)
    args = ["batch", str(path), "--bucket", s3_bucket, "--concurrency", "4", "--lookahead", "8"]
    args.append("--json")
    accepted = fal_emulator.stats["accepted"]
    duplicates = fal_emulator.stats["duplicate_submits"]

    proc = start_cli_process(args, env)
    try:
        deadline = time.monotonic() + 300
        while fal_emulator.stats["accepted"] - accepted < ACCEPTED_BEFORE_SIGNAL:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "fal did not accept the first submits in 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        stdout, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    paid = fal_emulator.stats["accepted"] - accepted
    print(f"exit {proc.returncode} {took:.1f}s after SIGTERM, {paid} accepted at fal")
    assert took < EXIT_DEADLINE_S, f"exited {took:.1f}s after SIGTERM:\n{stderr[-4000:]}"
    assert proc.returncode == 143, stderr[-4000:]
    assert "Traceback" not in stderr, stderr[-4000:]
    assert stdout.strip(), stderr[-4000:]
    summary = json.loads(stdout.strip().splitlines()[-1])  # --json still printed, one line
    # every request fal accepted is counted, with its id, and every row is accounted for
    assert summary["submitted"] == paid
    assert len(summary["failures"]) + len(summary["images"]) == ROWS
    in_flight = [f for f in summary["failures"] if f["error_type"] == "in_flight_interrupted"]
    ids = {f["request_id"] for f in in_flight}
    assert None not in ids and len(ids) == len(in_flight) == paid
    assert (tmp_path / "images").exists()
    # the manifest is in place with every row (staged too when the report closed in time)
    (manifest,) = (tmp_path / "images").glob("*/manifest.jsonl")
    assert len(manifest.read_text().splitlines()) == ROWS
    if "exiting before the run finished" not in stderr:
        assert summary["manifest_uri"], summary

    # the re-run resumes what fal accepted (its latency now short) and submits only the rest
    fal_emulator.configure(latency=0.5, concurrency_limit=8)
    again = run_cli_process(args, env)

    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["staged"] == ROWS
    assert fal_emulator.stats["duplicate_submits"] - duplicates == 0
    assert fal_emulator.stats["accepted"] - accepted == ROWS  # each row paid for exactly once
