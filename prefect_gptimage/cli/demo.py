"""``prefect-gptimage demo``: the whole pipeline offline, with nothing but this package.

Starts the bundled fal emulator (HTTPS) and a local S3 server (moto, over HTTP), points
fal_client, boto3 and Prefect at them (an ephemeral Prefect API with a throwaway home), runs
``batch_to_s3`` on the bundled sample prompt file, prints the S3 URIs and links, leaves the images
and an HTML gallery in ``output_dir``, and stops what it started.

fal_client reads its hosts when first imported, so this module sets the environment before
anything imports fal_client or Prefect.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from prefect_gptimage.cli._early_api import EarlyApi
from prefect_gptimage.errors import BatchIncomplete
from prefect_gptimage.testing.emulator import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

DEMO_BUCKET = "gptimage-demo"


def sample_prompt_file() -> Path:
    """The sample prompt file shipped with the package."""
    return Path(str(resources.files("prefect_gptimage") / "data" / "sample_prompts.jsonl"))


def run_demo(
    output_dir: str = "demo-output", *, prompt_file: str | None = None, latency: float = 1.0
) -> int:
    """Run the demo; returns the process exit status (0 when every image was staged)."""
    if "fal_client" in sys.modules:
        print(
            "demo: fal_client is already imported; run the demo in a fresh process", file=sys.stderr
        )
        return 2
    home = tempfile.mkdtemp(prefix="gptimage-demo-prefect-")
    with FalEmulator(latency=latency, concurrency_limit=4) as emulator, LocalS3Server() as s3:
        os.environ.update(emulator.env())
        os.environ.update(s3.env())
        os.environ.update({"FAL_KEY": "demo-key-id:demo-key-secret", "PREFECT_HOME": home})
        # a throwaway ephemeral API: no telemetry (its heartbeat also trips over SQLite locks)
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        # the home goes at exit, after the temporary API server (registered next) has stopped
        atexit.register(shutil.rmtree, home, ignore_errors=True)
        early = EarlyApi.start()  # Prefect's temporary API boots while we import Prefect
        s3.create_bucket(DEMO_BUCKET)
        print(f"fal emulator: {emulator.base_url}  S3: {s3.endpoint_url}  bucket: {DEMO_BUCKET}")

        from prefect_gptimage.flows.batch import batch_to_s3  # after the environment is set

        logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
        if early is not None:
            early.adopt()

        source = prompt_file or str(sample_prompt_file())
        state = batch_to_s3(
            source,
            bucket=DEMO_BUCKET,
            prefix="demo",
            output_dir=output_dir,
            concurrency=4,
            return_state=True,
        )
        summary: Any = state.result(raise_on_failure=False)
        if isinstance(summary, BatchIncomplete):
            summary = summary.summary
        if isinstance(summary, BaseException):
            print(f"demo failed: {summary}", file=sys.stderr)
            return 1
        print()
        for image in summary.images:
            print(image.get("s3_uri"))
            print(f"  link: {image.get('url')}")
            print(f"  file: {image.get('path')}")
        for failure in summary.failures:
            print(f"FAILED: {failure.reason}", file=sys.stderr)
        print(f"\nmanifest: {summary.manifest_uri}")
        print(f"gallery:  {summary.gallery}  (open it in a browser)")
        print("(the presigned links above point at the demo's S3 server and stop working with it)")
        stats = emulator.stats
        print(
            f"fal calls: {stats['submit']} submits, {stats['status']} status polls for "
            f"{len(summary.images)} images; on real fal about ${summary.estimated_cost_usd:.3f}"
        )
    return 0 if summary.ok and state.is_completed() else 1
