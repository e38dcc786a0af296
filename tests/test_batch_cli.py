"""`prefect-gptimage batch` as a user runs it, and a batch killed with SIGKILL then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from prefect_gptimage.testing import FalEmulator, Fault
from prefect_gptimage.testing.s3 import LocalS3Server


def env_for(harness: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_API_URL": str(harness["api_url"]),
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
        "PREFECT_GPTIMAGE_OUTPUT_DIR": str(tmp_path / "images"),
    }


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect_gptimage.cli", *args]


def mixed_rows(unique: str, n: int) -> list[dict[str, object]]:
    sizes = ["1024x1024", "1536x1024", "1024x1536"]
    formats = ["png", "jpeg", "webp"]
    return [
        {
            "prompt": f"row {i} of {unique}",
            "quality": "low",
            "image_size": sizes[i % 3],
            "output_format": formats[(i // 3) % 3],
            "num_images": 1 + i % 2,
        }
        for i in range(n)
    ]


def ours(emulator: FalEmulator, unique: str) -> Counter[str]:
    """How many times each of this test's prompts was accepted by the emulator."""
    return Counter(
        str(r.arguments["prompt"])
        for r in emulator.requests()
        if unique in str(r.arguments.get("prompt"))
    )


def bucket_objects(local_s3: LocalS3Server, bucket: str) -> dict[str, dict[str, Any]]:
    s3 = local_s3.client()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k: s3.head_object(Bucket=bucket, Key=k) for k in keys}


@pytest.mark.timeout(900)  # CLI runs and their re-run, each importing Prefect
def test_batch_cli_with_faults_then_rerun(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    prefect_harness: dict[str, Any],
    unique: str,
    tmp_path: Path,
) -> None:
    rows = mixed_rows(unique, 24)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fal_emulator.inject(Fault("status", "500_json", count=None, probability=0.2))
    fal_emulator.inject(Fault("result", "500_json", count=None, probability=0.3))
    fal_emulator.inject(Fault("media", "503_json", count=None, probability=0.3))
    env = env_for(prefect_harness, tmp_path)
    args = cli(
        "batch",
        str(path),
        "--bucket",
        s3_bucket,
        "--prefix",
        "runs",
        "--concurrency",
        "8",
        "--json",
    )
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    expected_images = sum(int(str(r["num_images"])) for r in rows)
    assert summary["staged"] == expected_images and summary["failures"] == []
    objs = bucket_objects(local_s3, s3_bucket)
    images = {k: v for k, v in objs.items() if "/manifests/" not in k}
    assert len(images) == expected_images
    assert all(str(v["ContentType"]).startswith("image/") for v in images.values())
    assert summary["manifest_uri"].removeprefix(f"s3://{s3_bucket}/") in objs
    counts = ours(fal_emulator, unique)
    assert len(counts) == 24 and set(counts.values()) == {1}  # every row once, none twice

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["submitted"] == 0
    assert ours(fal_emulator, unique) == counts
    assert {k: v["ETag"] for k, v in bucket_objects(local_s3, s3_bucket).items()} == {
        k: v["ETag"] for k, v in objs.items()
    }


@pytest.mark.timeout(900)  # CLI runs and their re-run, each importing Prefect
def test_batch_killed_half_way_resumes_without_paying_twice(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    prefect_harness: dict[str, Any],
    unique: str,
    tmp_path: Path,
) -> None:
    fal_emulator.set_latency(1.0)
    rows = [{"prompt": f"frame {i} {unique}", "quality": "low"} for i in range(12)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = env_for(prefect_harness, tmp_path)
    args = cli("batch", str(path), "--bucket", s3_bucket, "--concurrency", "4", "--json")
    # rows after the first four look queued at fal forever (they really run): once four of them
    # are in flight the run can submit nothing more, so the kill lands between submits
    stuck = {
        f"frame {i} {unique}": fal_emulator.inject(
            Fault("status", "stuck", count=None, match=f"frame {i} {unique}")
        )
        for i in range(4, 12)
    }
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        # mid-generation: eight accepted, and each one held at fal was polled, so its submit
        # had returned and was persisted (a row polls only a request it recorded)
        while time.monotonic() < deadline:
            accepted = ours(fal_emulator, unique)
            held = [p for p in accepted if p in stuck]
            if len(held) >= 4 and all(stuck[p].fired for p in held):
                break
            assert first.poll() is None, "the run ended before it was killed"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        first.wait(timeout=60)
    fal_emulator.clear_faults()
    done_before = ours(fal_emulator, unique)
    # really half way: at least four held in flight at fal, and not every row sent (which rows
    # finished first is the threads' race for the four fal slots)
    assert 4 <= sum(done_before.values()) < 12, done_before

    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["staged"] == 12
    counts = ours(fal_emulator, unique)
    assert len(counts) == 12 and set(counts.values()) == {1}  # nothing submitted a second time
    assert summary["submitted"] == 12 - len(done_before)
