"""The summary counts every request fal accepted, also when its row failed after (issue 18, item 2).

The fault is the operating system's: the CLI runs with a per-file size limit (``RLIMIT_FSIZE``)
between the sizes of the emulator's small and large images, so writing a large image fails with
``EFBIG`` ("File too large", what a full disk looks like to the writer: an ``OSError`` naming no
path) after fal accepted and completed its request, while small images, the manifest and the
gallery are written. ``submitted`` must equal what fal accepted, the cost count every paid row,
each failed paid row carry its request id, and the error name the folder it wrote to.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.schemas import GptImageRequest
from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

SMALL = {"image_size": "1024x1024", "output_format": "webp"}  # the emulator's: under 15 kB
LARGE = {"image_size": "1536x1024", "output_format": "jpeg"}  # over 43 kB
LIMIT = 30_000  # bytes a file may reach in the CLI's process


def _limit_file_size() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_rows_that_fail_after_paying_are_counted_with_their_request_ids(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    prefect_harness: dict[str, Any],
    unique: str,
    tmp_path: Path,
) -> None:
    rows = [
        {"prompt": f"accounting row {i} {unique}", "quality": "low", **(LARGE if i % 3 else SMALL)}
        for i in range(6)
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {
        **os.environ,
        "FAL_KEY": "accounting-key-id:accounting-key-secret",
        "PREFECT_API_URL": str(prefect_harness["api_url"]),
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
        "PREFECT_GPTIMAGE_OUTPUT_DIR": str(tmp_path / "images"),
    }
    accepted = fal_emulator.stats["accepted"]
    args = [sys.executable, "-m", "prefect_gptimage.cli", "batch", str(path)]
    args += ["--bucket", s3_bucket, "--concurrency", "3", "--json"]

    done = subprocess.run(
        args,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=_limit_file_size,
    )

    assert done.returncode == 1, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    paid = fal_emulator.stats["accepted"] - accepted
    large = [r for i, r in enumerate(rows) if i % 3]
    assert len(summary["images"]) == len(rows) - len(large)
    assert len(summary["failures"]) == len(large), summary["failures"]
    assert summary["submitted"] == paid == len(rows)
    expected_cost = sum(estimate_cost(GptImageRequest(**r)) for r in rows)
    assert summary["estimated_cost_usd"] == pytest.approx(expected_cost)
    ids = {r.request_id for r in fal_emulator.requests()}
    for failure in summary["failures"]:
        assert failure["paid"] is True, failure
        assert failure["request_id"] in ids, failure
        assert str(tmp_path / "images") in failure["reason"], failure["reason"]
    # the manifest's failure lines carry the paid request ids too
    (manifest,) = (tmp_path / "images").glob("*/manifest.jsonl")
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    failed = [line for line in lines if line.get("reason")]
    assert len(failed) == len(large)
    assert all(line["request_id"] in ids for line in failed), failed
