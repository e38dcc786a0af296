"""The CLI with no Prefect server configured: one temporary API, started early, gone at exit.

These run the CLI as a user without a Prefect server runs it: no ``PREFECT_API_URL``, a Prefect
home of its own. Prefect would start its temporary API on the first flow call; the CLI starts the
same server at launch, so it boots while Prefect is imported, and hands it to Prefect.
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
from conftest import run_cli_process

from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="finds processes through /proc"
)


def processes_with(variable: str, value: str) -> list[int]:
    """PIDs of live processes (of this user) whose environment has ``variable=value``."""
    needle = f"{variable}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environ:
            found.append(int(entry))
    return found


def user_env(home: Path, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
            "PREFECT_GPTIMAGE_OUTPUT_DIR": str(tmp_path / "images"),
        }
    )
    return env


@linux_only
def test_batch_without_a_server_runs_on_one_temporary_api_and_stops_it(
    fal_emulator: FalEmulator, local_s3: LocalS3Server, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"prompt": f"{unique} {i}", "quality": "low"}) + "\n" for i in range(2))
    )
    home = tmp_path / "prefect-home"
    env = user_env(home, tmp_path)

    done = run_cli_process(["batch", str(rows), "--bucket", s3_bucket, "--json"], env)

    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(summary["images"]) == 2
    assert all(i["s3_uri"].startswith(f"s3://{s3_bucket}/") for i in summary["images"])
    # Prefect found its API ready: it did not boot a second temporary server of its own
    assert "Starting temporary server" not in done.stderr
    assert "View at" not in done.stderr  # no link to a server that has no UI and is gone now
    assert "temporary API server" not in done.stderr  # a healthy server has nothing to report
    assert processes_with("PREFECT_HOME", str(home)) == []  # nothing left running

    # invalid input: exit 2 at once, and the server started at launch is stopped too
    bad = run_cli_process(["batch", str(tmp_path / "missing.jsonl"), "--bucket", s3_bucket], env)
    assert bad.returncode == 2
    assert "missing.jsonl" in bad.stderr
    assert processes_with("PREFECT_HOME", str(home)) == []


@linux_only
def test_api_url_in_the_users_profile_wins_over_a_temporary_server(
    fal_emulator: FalEmulator, prefect_harness: dict[str, Any], unique: str, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "team"\n\n[profiles.team]\n'
        f'PREFECT_API_URL = "{prefect_harness["api_url"]}"\n'
        'PREFECT_SERVER_ANALYTICS_ENABLED = "false"\n'
    )

    # a real run (a dry run runs no flow, so it records nothing anywhere)
    done = run_cli_process(
        ["generate", f"{unique} via profile", "--quality", "low"],
        {**user_env(home, tmp_path), "FAL_KEY": "profile-key-id:profile-secret"},
    )

    assert done.returncode == 0, done.stderr
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=50)
    # the run is recorded on the profile's server, not on a throwaway one
    assert any(unique in json.dumps(r.parameters, default=str) for r in runs)
    assert processes_with("PREFECT_HOME", str(home)) == []


@linux_only
def test_a_killed_cli_leaves_no_server_behind(tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    env = user_env(home, tmp_path)
    script = (
        "import os, signal, time\n"
        "from prefect_gptimage.cli._early_api import EarlyApi\n"
        "early = EarlyApi.start()\n"
        "print(early.process.pid, flush=True)\n"
        "time.sleep(1.0)\n"
        "os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no atexit, no cleanup of our own\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == -signal.SIGKILL
    server = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10
    while processes_with("PREFECT_HOME", str(home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with("PREFECT_HOME", str(home)) == [], f"server {server} still running"


def test_an_overwhelmed_temporary_server_is_summed_up_not_flooded() -> None:
    from prefect_gptimage.cli._early_api import summarize_server_log

    dropped = (
        "09:18:23.817 | WARNING | prefect.server.utilities.messaging.memory - Subscription queue"
        " is full, dropping message for topic='events' queue_size=10000 retry_queue_size=0\n"
    )
    error = (
        "09:40:12.690 | ERROR   | prefect.server.services.task_run_recorder - Error flushing 1"
        " events (1 to retry, 0 dropped)\nTraceback (most recent call last):\n  ...\n"
    )

    lines = summarize_server_log(dropped * 3000 + error * 2)

    assert len(lines) == 2
    assert "dropped 3000 task-run event(s)" in lines[0]
    assert "PREFECT_API_URL" in lines[0]  # what to do about it
    assert "2 error(s)/warning(s)" in lines[1]
    assert summarize_server_log("") == []
