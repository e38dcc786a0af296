"""SIGTERM and SIGINT during ``batch`` and ``generate`` (issue 12, item 9).

The CLI runs as a user runs it (a subprocess against the bundled emulator); a signal lands once
fal has accepted the first submit. It must stop submitting, cancel nothing, exit within 10 s with
the summary, and a re-run must finish the job without a single duplicate submit.

Under load a process is slow to do anything, so "exit within 10 s" is checked as two things that
hold there too: fal accepts nothing of the run after the signal plus the stop's grace (emulator
timestamps, the test's own clock), and the process is gone within a generous 60 s.
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

import pytest

from prefect_gptimage.engine.stop import STOP_GRACE_S
from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

ROWS = 12
#: Seconds from the signal to the process's exit: the product's 10 s, with room for a loaded machine
EXIT_DEADLINE_S = 60.0


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
) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Run ``args``, send ``sig`` once fal accepted a submit; (the finished run, seconds it took
    to exit after the signal, when the signal was sent as a Unix time: the emulator's clock)."""
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
        sent, at = time.monotonic(), time.time()
        stdout, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr), took, at


def accepted_after(emulator: FalEmulator, unique: str, moment: float) -> list[float]:
    """How long after ``moment`` (a Unix time) fal accepted each of this test's requests that it
    accepted later."""
    return [
        r.submitted_at - moment
        for r in emulator.requests()
        if unique in str(r.arguments.get("prompt")) and r.submitted_at > moment
    ]


@pytest.mark.timeout(900)  # CLI runs and their re-run, each importing Prefect
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

    done, took, sent = signal_after_first_accept(args, env, fal_emulator, signal.SIGTERM)

    # submitting stopped: nothing of this run reached fal after the signal and the grace
    assert accepted_after(fal_emulator, unique, sent + STOP_GRACE_S) == []
    assert took < EXIT_DEADLINE_S, f"exited {took:.1f}s after SIGTERM"
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


@pytest.mark.timeout(900)  # CLI runs and their re-run, each importing Prefect
def test_sigint_during_generate_exits_130_and_a_rerun_resumes_the_request(
    fal_emulator: FalEmulator, prefect_harness: dict[str, Any], unique: str, tmp_path: Path
) -> None:
    fal_emulator.set_latency(8.0)  # still running at fal when the signal's grace is over
    env = cli_env(prefect_harness, tmp_path)
    args = cli("generate", f"a signal at dawn {unique}", "--quality", "low", "--json")
    accepted = fal_emulator.stats["accepted"]
    duplicates = fal_emulator.stats["duplicate_submits"]
    cancels = fal_emulator.stats["cancel"]

    done, took, sent = signal_after_first_accept(args, env, fal_emulator, signal.SIGINT)

    print(f"generate: exit {done.returncode} {took:.1f}s after SIGINT")
    assert accepted_after(fal_emulator, unique, sent + STOP_GRACE_S) == []
    assert fal_emulator.stats["accepted"] - accepted == 1  # the one request, not resubmitted
    assert took < EXIT_DEADLINE_S, f"exited {took:.1f}s after SIGINT"
    assert done.returncode == 130, done.stderr[-4000:]
    assert "re-run resumes" in done.stderr or "run the same command again" in done.stderr
    assert fal_emulator.stats["cancel"] == cancels  # nothing cancelled at fal

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)

    assert again.returncode == 0, again.stderr[-4000:]
    assert len(json.loads(again.stdout.strip().splitlines()[-1])["images"]) == 1
    assert fal_emulator.stats["accepted"] - accepted == 1
    assert fal_emulator.stats["duplicate_submits"] - duplicates == 0
