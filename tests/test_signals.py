"""SIGTERM and SIGINT during ``batch`` and ``generate`` (issue 12, item 9).

The CLI runs as a user runs it (a subprocess against the bundled emulator); a signal lands once
fal has accepted the first submit. It must stop submitting, cancel nothing, exit within 10 s with
the summary, and a re-run must finish the job without a single duplicate submit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

ROWS = 12


def cli_env(harness: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FAL_KEY": "signals-key-id:signals-key-secret",
        "PREFECT_API_URL": str(harness["api_url"]),
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
        "PREFECT_GPTIMAGE_OUTPUT_DIR": str(tmp_path / "images"),
    }


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect_gptimage.cli", *args]


def signal_after_first_accept(
    args: list[str], env: dict[str, str], emulator: FalEmulator, sig: signal.Signals
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``args``, send ``sig`` once fal accepted a submit; (the finished run, seconds it took
    to exit after the signal)."""
    accepted = emulator.stats["accepted"]
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while emulator.stats["accepted"] == accepted and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert emulator.stats["accepted"] > accepted, "no submit reached fal in 120 s"
        proc.send_signal(sig)
        sent = time.monotonic()
        stdout, stderr = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr), took


def test_sigterm_stops_a_batch_and_a_rerun_pays_nothing_twice(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    prefect_harness: dict[str, Any],
    unique: str,
    tmp_path: Path,
) -> None:
    fal_emulator.set_latency(2.0)
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"signal row {i} {unique}", "quality": "low"}) + "\n"
            for i in range(ROWS)
        )
    )
    env = cli_env(prefect_harness, tmp_path)
    args = cli("batch", str(path), "--bucket", s3_bucket, "--concurrency", "2", "--json")
    accepted = fal_emulator.stats["accepted"]
    duplicates = fal_emulator.stats["duplicate_submits"]
    cancels = fal_emulator.stats["cancel"]

    done, took = signal_after_first_accept(args, env, fal_emulator, signal.SIGTERM)

    assert took < 10, f"exited {took:.1f}s after SIGTERM"
    assert done.returncode == 143, done.stderr[-4000:]
    submitted = fal_emulator.stats["accepted"] - accepted
    print(f"batch: exit {done.returncode} {took:.1f}s after SIGTERM, {submitted} submit(s)")
    assert 0 < submitted < ROWS
    assert fal_emulator.stats["cancel"] == cancels  # nothing cancelled at fal
    assert done.stdout.strip(), done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # the summary is printed
    assert len(summary["failures"]) + len(summary["images"]) == ROWS
    not_started = [f for f in summary["failures"] if f["error_type"] == "not_started_interrupted"]
    assert not_started and "not started (interrupted)" in done.stderr
    assert summary["staged"] == len(summary["images"])
    assert "SIGTERM" in done.stderr

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)

    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["staged"] == ROWS
    assert fal_emulator.stats["duplicate_submits"] - duplicates == 0
    assert fal_emulator.stats["accepted"] - accepted == ROWS  # each row paid for exactly once


def test_sigint_during_generate_exits_130_and_a_rerun_resumes_the_request(
    fal_emulator: FalEmulator, prefect_harness: dict[str, Any], unique: str, tmp_path: Path
) -> None:
    fal_emulator.set_latency(8.0)  # still running at fal when the signal's grace is over
    env = cli_env(prefect_harness, tmp_path)
    args = cli("generate", f"a signal at dawn {unique}", "--quality", "low", "--json")
    accepted = fal_emulator.stats["accepted"]
    duplicates = fal_emulator.stats["duplicate_submits"]
    cancels = fal_emulator.stats["cancel"]

    done, took = signal_after_first_accept(args, env, fal_emulator, signal.SIGINT)

    print(f"generate: exit {done.returncode} {took:.1f}s after SIGINT")
    assert took < 10, f"exited {took:.1f}s after SIGINT"
    assert done.returncode == 130, done.stderr[-4000:]
    assert "re-run resumes" in done.stderr or "run the same command again" in done.stderr
    assert fal_emulator.stats["cancel"] == cancels  # nothing cancelled at fal

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)

    assert again.returncode == 0, again.stderr[-4000:]
    assert len(json.loads(again.stdout.strip().splitlines()[-1])["images"]) == 1
    assert fal_emulator.stats["accepted"] - accepted == 1
    assert fal_emulator.stats["duplicate_submits"] - duplicates == 0
