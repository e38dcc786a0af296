"""No case drives the process above 500 MB RSS (issue 12, item 12 and "done").

A CLI batch, run as a user runs it, with the largest bodies the emulator can send: a 1 GiB
result (one ``sync_mode`` image as a ``data:`` URI, stopped at the 36 MiB limit), four of the
largest images as ``data:`` URIs, and four of the largest images downloaded and staged. The peak
RSS of the CLI process is read from the kernel when it ends.

A result just *under* the limit (35 MiB: one ``data:`` URI) is read, validated and persisted as
the task's cached result, and that persistence (Prefect's pickle, base64 and JSON record) makes
several copies of it: ~6x its size. At the former 64 MiB limit, a 60 MiB result drove the CLI
to 558 MiB (2026-11-30), so the limit is now 36 MiB: four ``sync_mode`` images of the largest
size (1536x1024 RGBA, even uncompressed) still fit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from prefect_gptimage.testing import FalEmulator, Fault
from prefect_gptimage.testing.s3 import LocalS3Server

LIMIT = 500 * 10**6  # bytes: "500 MB"
LARGEST: dict[str, Any] = {"quality": "high", "image_size": "1536x1024", "output_format": "png"}

#: Runs the command given as arguments, then writes its peak RSS (bytes) to $PEAK_RSS_FILE.
_MEASURE = """
import os, resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
open(os.environ["PEAK_RSS_FILE"], "w").write(str(peak))
sys.exit(code)
"""


ROWS: dict[str, dict[str, Any]] = {
    "huge-result": {"quality": "low"},
    "sync-largest": {**LARGEST, "num_images": 4, "sync_mode": True},
    "media-largest": {**LARGEST, "num_images": 4},
    "big-data-uri": {"quality": "low"},
}
#: the rows that cannot be used: refused at the limit, or not an image
UNUSABLE = {"huge-result", "big-data-uri"}


@pytest.mark.parametrize(
    "names",
    [
        pytest.param(["huge-result", "sync-largest", "media-largest"], id="largest"),
        pytest.param(["big-data-uri"], id="result-just-under-the-limit"),
    ],
)
def test_largest_bodies_keep_the_cli_under_500_mb(
    names: list[str],
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    prefect_harness: dict[str, Any],
    unique: str,
    tmp_path: Path,
) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"memory {name} {unique}", **ROWS[name]}) + "\n" for name in names
        )
    )
    fal_emulator.inject(Fault("result", "huge", count=None, size=1 << 30, match="huge-result"))
    fal_emulator.inject(Fault("result", "huge", count=None, size=35 << 20, match="big-data-uri"))
    peak_file = tmp_path / "peak"
    env = {
        **os.environ,
        "FAL_KEY": "memory-key-id:memory-key-secret",
        "PREFECT_API_URL": str(prefect_harness["api_url"]),
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
        "PREFECT_GPTIMAGE_OUTPUT_DIR": str(tmp_path / "images"),
        "PEAK_RSS_FILE": str(peak_file),
    }
    cli = [sys.executable, "-m", "prefect_gptimage.cli", "batch", str(path)]
    cli += ["--bucket", s3_bucket, "--concurrency", "4", "--json"]

    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cli],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )

    peak = int(peak_file.read_text())
    print(f"CLI peak RSS {peak / 2**20:.0f} MiB (limit {LIMIT / 2**20:.0f} MiB)")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {f["prompt"].split()[1]: f for f in summary["failures"]}
    assert set(failed) == UNUSABLE & set(names), done.stderr[-4000:]
    if "huge-result" in failed:
        assert "byte limit" in failed["huge-result"]["reason"]
    images = sum(ROWS[n].get("num_images", 1) for n in names if n not in UNUSABLE)
    assert len(summary["images"]) == summary["staged"] == images, done.stderr[-4000:]
    assert done.returncode == 1  # a row could not be used
    assert peak < LIMIT, f"the CLI peaked at {peak / 2**20:.0f} MiB RSS"
