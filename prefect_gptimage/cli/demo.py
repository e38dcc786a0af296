"""``prefect-gptimage demo``: the whole pipeline offline, with nothing but this package.

Starts the bundled fal emulator (HTTPS) and a local S3 server (moto, over HTTP), points
fal_client, boto3 and Prefect at them (a temporary Prefect API), runs ``batch_to_s3`` on the
bundled sample prompt file, prints the S3 URIs and links, leaves the images and an HTML gallery in
``output_dir/<run>/``, and stops what it started.

The demo's Prefect home, with its database and result storage (the cache), is kept in
``output_dir/.prefect``: a second run into the same folder finds every request in the cache, says
it submitted nothing, and rewrites the same files. Each run's folder holds that run's images only:
a folder the cache cannot vouch for (from an older version, or with images deleted since) is
emptied and generated afresh, and files the run did not write are removed at the end.

moto is not a runtime dependency: without it the demo says in one line what to install.

fal_client reads its hosts when first imported, so this module sets the environment before
anything imports fal_client or Prefect.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

DEMO_BUCKET = "gptimage-demo"
#: What the demo asks a user without moto to run.
INSTALL_HINT = 'pip install "prefect-gptimage[demo]"'
#: The demo's Prefect home (database, result storage: the cache), inside the output folder.
HOME_DIR = ".prefect"
#: Files of a run's folder that are not images.
REPORT_FILES = frozenset({"manifest.jsonl", "index.html"})


def sample_prompt_file() -> Path:
    """The sample prompt file shipped with the package."""
    return Path(str(resources.files("prefect_gptimage") / "data" / "sample_prompts.jsonl"))


def moto_missing() -> str | None:
    """Why the local S3 server cannot start (moto or its server extra missing), or None."""
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        return f"the demo needs moto's S3 server, which is not installed ({exc.name or exc})"
    return None


def _record_path(home: Path, run_key: str) -> Path:
    return home / "demo-runs" / f"{run_key}.json"


def _prepare_run_folder(home: Path, run_folder: Path, run_key: str) -> bool:
    """Whether the cache can serve this run. If not, the run's folder is emptied first.

    The cache holds fal's answers, whose media URLs pointed at an emulator that is gone now; a
    cached run reuses the images already on disk. So the cache is used only when the last
    complete run into this folder left every one of its images in place.
    """
    try:
        names = json.loads(_record_path(home, run_key).read_text(encoding="utf-8"))
        usable = bool(names) and all((run_folder / str(n)).is_file() for n in names)
    except (OSError, ValueError, TypeError):
        usable = False
    if not usable:
        shutil.rmtree(run_folder, ignore_errors=True)
        _record_path(home, run_key).unlink(missing_ok=True)
    return usable


def _keep_only_this_run(home: Path, run_folder: Path, run_key: str, summary: Any) -> None:
    """Remove files of ``run_folder`` this run did not write; remember what it wrote."""
    if len(summary.images) < summary.images_total:
        return  # the summary lists a part of the images only: do not guess at the rest
    mine = {Path(str(image.get("path"))).name for image in summary.images if image.get("path")}
    if run_folder.is_dir():
        for entry in run_folder.iterdir():
            if entry.name not in mine and entry.name not in REPORT_FILES:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
    if summary.ok and mine:
        record = _record_path(home, run_key)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(sorted(mine)), encoding="utf-8")


def run_demo(
    output_dir: str = "demo-output", *, prompt_file: str | None = None, latency: float = 1.0
) -> int:
    """Run the demo; returns the process exit status (0 when every image was staged)."""
    if "fal_client" in sys.modules:
        print(
            "demo: fal_client is already imported; run the demo in a fresh process", file=sys.stderr
        )
        return 2
    missing = moto_missing()
    if missing:
        print(f"prefect-gptimage: {missing}: {INSTALL_HINT}", file=sys.stderr)
        return 2

    from prefect_gptimage.cli._server import ApiUnavailable, start_api
    from prefect_gptimage.errors import BatchIncomplete
    from prefect_gptimage.testing.emulator import FalEmulator
    from prefect_gptimage.testing.s3 import LocalS3Server

    out = Path(output_dir).expanduser().resolve()
    home = out / HOME_DIR
    home.mkdir(parents=True, exist_ok=True)
    source = prompt_file or str(sample_prompt_file())
    with FalEmulator(latency=latency, concurrency_limit=4) as emulator, LocalS3Server() as s3:
        os.environ.update(emulator.env())
        os.environ.update(s3.env())
        os.environ.update(
            {
                "FAL_KEY": "demo-key-id:demo-key-secret",
                "PREFECT_HOME": str(home),
                "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
            }
        )
        s3.create_bucket(DEMO_BUCKET)
        print(f"fal emulator: {emulator.base_url}  S3: {s3.endpoint_url}  bucket: {DEMO_BUCKET}")

        # after the environment is set
        from prefect_gptimage.flows.batch import batch_to_s3
        from prefect_gptimage.prompts import run_key_for

        logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
        try:
            run_key = run_key_for(source, None)
        except OSError as exc:
            print(f"prefect-gptimage: error: {source}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        run_folder = out / run_key
        from_cache = _prepare_run_folder(home, run_folder, run_key)
        try:
            start_api()  # Prefect's temporary API, stopped even if the demo is killed
        except ApiUnavailable as exc:
            print(f"demo: Prefect's temporary API server did not start: {exc}", file=sys.stderr)
            return 1

        state = batch_to_s3(
            source,
            bucket=DEMO_BUCKET,
            prefix="demo",
            output_dir=str(out),
            concurrency=4,
            refresh=not from_cache,  # answers cached by an unusable run point at a dead emulator
            return_state=True,
        )
        summary: Any = state.result(raise_on_failure=False)
        if isinstance(summary, BatchIncomplete):
            summary = summary.summary
        if isinstance(summary, BaseException):
            print(f"demo failed: {summary}", file=sys.stderr)
            return 1
        _keep_only_this_run(home, run_folder, run_key, summary)
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
        if stats["submit"] == 0 and summary.submitted == 0 and summary.images:
            print(
                f"fal calls: 0 new submits: every image came from the cache ({home}); "
                "on real fal this run cost $0.000"
            )
        else:
            print(
                f"fal calls: {stats['submit']} submits, {stats['status']} status polls for "
                f"{len(summary.images)} images; on real fal about "
                f"${summary.estimated_cost_usd:.3f}. Run it again: the cache pays for nothing."
            )
    return 0 if summary.ok and state.is_completed() else 1
