"""Redis or the Prefect server restarted in the middle of a batch (issue 9, item 5).

A batch runs as a user runs it, ``prefect-gptimage batch`` in a process of its own (its own
``PREFECT_HOME``), against the session's real services: ``prefect server start`` on PostgreSQL
(``PREFECT_API_URL``), results in moto's S3 through an S3Bucket block on that server
(``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``), and, for the lock, a real ``redis-server``
(``PREFECT_GPTIMAGE_LOCK_URL``). Half way through, one service is restarted as an operator would
(stopped, started again on the same port with the same files). What a user notices is asserted:
every image staged (the run, or a re-run of the same command), no request paid twice (the fal
emulator's ``duplicate_submits``), never more requests running at fal than the cap, and no slot
of the global concurrency limit left taken afterwards (a later batch would wait for it).

The module starts no Prefect API of its own in this process: the batches report to the session's
server, which this module restarts (other modules in this worker process run before or after,
never during).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import start_cli_process
from real_services import PrefectServer, RedisServer, client_env

from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

#: Each test runs processes and services: minutes when the machine is loaded.
pytestmark = pytest.mark.timeout(900)  # service restarts and CLI runs, on a loaded machine

#: The cap: the global concurrency limit in the Prefect-server test, ``--concurrency`` in the
#: Redis one. The batch keeps 2x this many rows in flight, so rows wait for slots.
CAP = 3
ROWS = 12
#: How long each request runs at fal: long enough that requests are running, and rows hold or
#: wait for slots, all through a restart.
LATENCY = 1.5


@pytest.fixture(scope="module", autouse=True)
def _prefect() -> None:
    """Replaces the suite's in-process Prefect harness: only the CLI processes talk to Prefect."""


@pytest.fixture(scope="module")
def results_block(prefect_server: PrefectServer, local_s3: LocalS3Server) -> str:
    """An S3Bucket block for results on the server, without keys (each process signs with the
    AWS credentials of its environment): the value of PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_aws import S3Bucket

    bucket, name = f"results-{uuid.uuid4().hex[:12]}", f"restart-results-{uuid.uuid4().hex[:8]}"
    local_s3.create_bucket(bucket)
    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
        S3Bucket(bucket_name=bucket, bucket_folder="prefect-results").save(name)
    return f"s3-bucket/{name}"


@pytest.fixture
def limit(prefect_server: PrefectServer) -> Iterator[str]:
    """A global concurrency limit of CAP, under a name of this test's own."""
    name = prefect_server.create_limit(CAP, "fal-restart")
    yield name
    prefect_server.delete_limit(name)


def prompt_file(path: Path, tag: str) -> Path:
    rows = [
        {"prompt": f"{tag}: a lighthouse, row {i:02d}", "quality": "low", "output_format": "jpeg"}
        for i in range(ROWS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def start_batch(file: Path, bucket: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """``prefect-gptimage batch`` as a user runs it, ``--json`` summary on stdout; ``--verbose``,
    so its log shows each retry (without it the CLI prints only errors)."""
    args = ["batch", str(file), "--bucket", bucket, "--prefix", "restart", "--json", "--verbose"]
    return start_cli_process([*args, "--concurrency", str(CAP)], env)


def summary_of(batch: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    """The run's JSON summary (with its exit status as ``returncode``) and its log."""
    out, err = batch.communicate(timeout=240)
    lines = out.strip().splitlines()
    assert lines, f"no summary (exit {batch.returncode}):\n{err[-4000:]}"
    summary: dict[str, Any] = json.loads(lines[-1])
    summary["returncode"] = batch.returncode
    return summary, err


def peak_running(emulator: FalEmulator, tag: str) -> int:
    """The most of this batch's requests running at fal at one moment (from their timings)."""
    steps = []
    for info in emulator.requests():
        if tag in str(info.arguments.get("prompt")) and info.started_at is not None:
            steps += [(info.started_at, 1), (info.completed_at or time.time(), -1)]
    running = peak = 0
    for _, step in sorted(steps):  # an end before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


def staged_images(s3: LocalS3Server, bucket: str) -> list[str]:
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix="restart/")
    return [o["Key"] for o in listed.get("Contents", []) if "/manifests/" not in o["Key"]]


def accepted_prompts(emulator: FalEmulator, tag: str) -> list[str]:
    """This batch's prompts fal has accepted so far (a prompt twice: paid twice)."""
    return [str(r.arguments["prompt"]) for r in emulator.requests() if tag in str(r.arguments)]


@dataclass
class Restarted:
    """A batch run through a restart: each run's summary (``paid``: the prompts fal had accepted
    by its end) and log, how long the service was away, and what fal accepted meanwhile."""

    runs: list[dict[str, Any]]
    logs: list[str]
    down: float
    accepted: int
    duplicate_submits: int
    peak_running: int


def run_through_restart(
    restart: Callable[[], float],
    server: PrefectServer,
    emulator: FalEmulator,
    bucket: str,
    folder: Path,
    **env: str,
) -> Restarted:
    """Run a batch of ROWS rows; restart the service once a third of them are at fal; then, if
    rows failed, run the same command again (as a user would), until one run ends well or three
    have run."""
    tag = uuid.uuid4().hex[:10]
    emulator.set_latency(LATENCY)
    before = emulator.stats
    file = prompt_file(folder / "rows.jsonl", tag)
    environment = client_env(server.api_url, folder / "home", **env)
    batch = start_batch(file, bucket, environment)
    deadline = time.monotonic() + 240  # a CLI process start: slow on a loaded machine
    while len(accepted_prompts(emulator, tag)) < ROWS // 3:
        assert batch.poll() is None, "the batch ended before the restart"
        assert time.monotonic() < deadline, "the batch made no progress"
        time.sleep(0.05)
    down = restart()
    runs: list[dict[str, Any]] = []
    logs: list[str] = []
    while True:
        summary, log = summary_of(batch)
        summary["paid"] = accepted_prompts(emulator, tag)
        runs.append(summary)
        logs.append(log)
        failures = [(f["error_type"], f["reason"][:200]) for f in summary["failures"]]
        print(f"run {len(runs)}: exit {summary['returncode']}, submitted {summary['submitted']}")
        print("\n".join(f"  failed: {f}" for f in failures))
        (folder / f"run-{len(runs)}.log").write_text(log)
        if summary["returncode"] == 0 or len(runs) == 3:
            break
        batch = start_batch(file, bucket, environment)
    after = emulator.stats
    return Restarted(
        runs,
        logs,
        down,
        after.accepted - before.accepted,
        after.duplicate_submits - before.duplicate_submits,
        peak_running(emulator, tag),
    )


def assert_every_image_staged_once(done: Restarted, s3: LocalS3Server, bucket: str) -> None:
    """The last run ended well, every row's image is in the bucket, each request paid once."""
    print(f"away {done.down:.1f} s; {len(done.runs)} run(s); peak at fal {done.peak_running}")
    assert done.runs[-1]["returncode"] == 0 and done.runs[-1]["failures"] == []
    assert len(staged_images(s3, bucket)) == ROWS
    assert done.accepted == ROWS and done.duplicate_submits == 0
    assert done.peak_running <= CAP


def test_prefect_server_restarted_mid_batch(
    prefect_server: PrefectServer,
    results_block: str,
    limit: str,
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    """The Prefect server (PostgreSQL, a global limit of 3) restarts while requests hold and wait
    for slots: the batch rides it out, every image is staged, none paid twice, never more than 3
    running at fal, and no slot is left taken."""

    def restart() -> float:
        assert prefect_server.active_slots(limit) > 0  # slots are held across the restart
        return prefect_server.restart(down=1.0)

    done = run_through_restart(
        restart,
        prefect_server,
        fal_emulator,
        s3_bucket,
        tmp_path,
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=results_block,
        PREFECT_GPTIMAGE_CONCURRENCY_LIMIT_NAME=limit,
    )
    assert_every_image_staged_once(done, local_s3, s3_bucket)
    assert done.down > 3  # really away while rows were in flight
    assert len(done.runs) == 1, "the batch did not ride out the restart"
    assert done.peak_running >= 2  # rows overlapped: the limit was what held them to 3
    assert prefect_server.active_slots(limit) == 0  # every slot given back


def test_redis_restarted_mid_batch(
    prefect_server: PrefectServer,
    results_block: str,
    redis_server: RedisServer,
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    """Redis (the submit lock, no persistence) restarts while rows take, wait for and give back
    their locks: each lock call is retried within the budget, so the first run stages every
    image, pays each request once, and leaves no lock behind in Redis."""
    from redis import Redis

    done = run_through_restart(
        lambda: redis_server.restart(down=1.0),
        prefect_server,
        fal_emulator,
        s3_bucket,
        tmp_path,
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=results_block,
        PREFECT_GPTIMAGE_LOCK_URL=redis_server.url,
        PREFECT_LOGGING_ROOT_LEVEL="INFO",  # the log shows each retry of a lock call
    )
    assert_every_image_staged_once(done, local_s3, s3_bucket)
    assert done.down > 1  # really away while rows were in flight
    assert len(done.runs) == 1, "the batch did not ride out the restart"
    retried = re.findall(r"retrying after transient failure.*: lock service", done.logs[0])
    print(f"{len(retried)} lock call(s) retried")
    assert retried  # lock calls met the restart, and were retried
    assert Redis.from_url(redis_server.url).keys("lock:*") == []  # every lock given back
