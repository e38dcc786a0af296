"""Two machines run ``prefect-gptimage batch`` at once, and one is killed and restarted (issue 9).

Each "machine" is the real console script (``prefect-gptimage`` in the venv) in a process of its
own, with its own ``PREFECT_HOME``. They share what a team shares in production:

* one ``prefect server start`` on PostgreSQL (``PREFECT_API_URL``);
* result storage in S3 (moto's S3 server) through Prefect's own setting,
  ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=s3-bucket/<name>``: a prefect-aws ``S3Bucket`` block
  saved on that server;
* a real ``redis-server`` through ``PREFECT_GPTIMAGE_LOCK_URL``.

Their two prompt files have 20 rows each, 10 of them in both (every other row, in the same
order): 30 distinct requests, and both runs reach the shared ones together. The fal emulator
counts what was paid (``accepted``, ``duplicate_submits``).

The services start once for the module. The tests reach them only through the CLI processes, so
the suite's in-process Prefect harness is not started for them (``_prefect`` below).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from real_services import (
    PostgresServer,
    PrefectServer,
    RedisServer,
    missing,
)

from prefect_gptimage.testing import FalEmulator, Fault
from prefect_gptimage.testing.s3 import LocalS3Server

#: Each test runs processes and services: minutes when the machine is loaded.
pytestmark = pytest.mark.timeout(900)  # CLI processes and a restarted batch, on a loaded machine

#: The console script a user runs (installed beside this interpreter).
CLI = str(Path(sys.executable).with_name("prefect-gptimage"))
#: Requests in flight per machine: each run is 5 waves, long enough to overlap the other's.
CONCURRENCY = 4
#: Where the S3Bucket block keeps Prefect's records (cache records and submit intents).
RESULTS_FOLDER = "prefect-results"
BLOCK = "gptimage-results"


@pytest.fixture(scope="module", autouse=True)
def _prefect() -> None:
    """Replaces the suite's autouse in-process Prefect harness for this module: no flow runs in
    this process (the CLI processes report to the module's own server)."""


@dataclass
class Services:
    server: PrefectServer
    redis: RedisServer
    s3: LocalS3Server
    results_bucket: str


@pytest.fixture(scope="module")
def services(local_s3: LocalS3Server) -> Iterator[Services]:
    """Redis, PostgreSQL and a Prefect server on it, and the S3Bucket block for results saved on
    that server (as an operator would, once)."""
    absent = missing("initdb", "pg_ctl", "createdb", "redis-server")
    if absent:
        pytest.skip(f"not installed: {', '.join(absent)} (apt-get install postgresql redis-server)")
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_aws import S3Bucket

    redis, pg = RedisServer(), PostgresServer()
    redis_thread = threading.Thread(target=redis.start)  # beside PostgreSQL's initdb
    redis_thread.start()
    try:
        with pg, PrefectServer(pg) as server:
            redis_thread.join()
            assert redis.running, "redis-server did not start"
            results_bucket = f"results-{uuid.uuid4().hex[:12]}"
            local_s3.create_bucket(results_bucket)
            # as the README has it: no keys in the block, so each machine signs with its own
            # AWS credentials (here moto's, with AWS_ENDPOINT_URL_S3, from the environment)
            block = S3Bucket(bucket_name=results_bucket, bucket_folder=RESULTS_FOLDER)
            with temporary_settings({PREFECT_API_URL: server.api_url}):
                block.save(BLOCK, overwrite=True)
            yield Services(server, redis, local_s3, results_bucket)
    finally:
        redis_thread.join()
        redis.stop()


def machine_env(services: Services, name: str, root: Path) -> dict[str, str]:
    """A process on its own "machine": a fresh Prefect home, the shared server, storage and lock;
    fal (the emulator), AWS (moto) and the suite's retry cap from this process's environment."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") or k.startswith("PREFECT_GPTIMAGE_")
    }
    env.update(
        PREFECT_HOME=tempfile.mkdtemp(prefix=f"gptimage-{name}-", dir=root),
        PREFECT_API_URL=services.server.api_url,
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=f"s3-bucket/{BLOCK}",
        PREFECT_GPTIMAGE_LOCK_URL=services.redis.url,
        PREFECT_GPTIMAGE_OUTPUT_DIR=str(root / name / "images"),
    )
    return env


@dataclass
class Files:
    a: Path
    b: Path
    shared: list[str]
    only_a: list[str]
    only_b: list[str]

    @property
    def prompts_a(self) -> list[str]:
        return self.shared + self.only_a

    @property
    def prompts_b(self) -> list[str]:
        return self.shared + self.only_b


def prompt_files(root: Path, unique: str) -> Files:
    """Two 20-row files sharing 10 rows, interleaved (shared, own, shared, own...) in the same
    order, so both runs reach the shared rows together all along. Prompts read
    ``<unique>:<shared|a|b>:<early|late> row <i>``: rows 5 to 9 of each group (the second half
    of each file) are "late"."""

    def group(name: str) -> list[str]:
        return [f"{unique}:{name}:{'late' if i >= 5 else 'early'} row {i}" for i in range(10)]

    shared, only_a, only_b = group("shared"), group("a"), group("b")
    paths = []
    for name, own in (("a", only_a), ("b", only_b)):
        path = root / f"prompts-{name}.jsonl"
        prompts = [p for pair in zip(shared, own, strict=True) for p in pair]
        rows = [{"prompt": p, "quality": "low", "output_format": "jpeg"} for p in prompts]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return Files(paths[0], paths[1], shared, only_a, only_b)


def batch_command(path: Path, bucket: str) -> list[str]:
    options = ["--bucket", bucket, "--prefix", "runs", "--concurrency", str(CONCURRENCY)]
    return [CLI, "batch", str(path), *options, "--json"]


Start = Callable[[list[str], dict[str, str]], subprocess.Popen[str]]


@pytest.fixture
def start() -> Iterator[Start]:
    """Starts a machine's command; any still running when the test ends is killed."""
    procs: list[subprocess.Popen[str]] = []

    def launch(command: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        procs.append(proc)
        return proc

    yield launch
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def finish(proc: subprocess.Popen[str], ok: bool = True) -> dict[str, Any]:
    """The run's ``--json`` summary, and its exit status as ``returncode``."""
    out, err = proc.communicate(timeout=240)
    if ok:
        assert proc.returncode == 0, err[-4000:]
    lines = out.strip().splitlines()
    assert lines, f"no output (exit {proc.returncode}):\n{err[-4000:]}"
    summary: dict[str, Any] = json.loads(lines[-1])
    summary["returncode"] = proc.returncode
    return summary


def accepted_by_prompt(emulator: FalEmulator, unique: str) -> Counter[str]:
    """How many times fal accepted each of this test's prompts."""
    return Counter(
        str(r.arguments["prompt"])
        for r in emulator.requests()
        if unique in str(r.arguments.get("prompt"))
    )


def objects(s3: LocalS3Server, bucket: str, prefix: str = "") -> list[str]:
    client = s3.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def manifest_lines(s3: LocalS3Server, summary: dict[str, Any]) -> list[dict[str, Any]]:
    bucket, _, key = str(summary["manifest_uri"]).removeprefix("s3://").partition("/")
    body = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def assert_complete(
    s3: LocalS3Server,
    summary: dict[str, Any],
    prompts: list[str],
    bucket: str,
    unknown: frozenset[str] = frozenset(),
) -> None:
    """The run's manifest has one line per prompt: an image staged in the bucket, or, for the
    prompts in ``unknown``, a failure "outcome unknown, possibly billed"."""
    assert summary["staged"] == len(prompts) - len(unknown), summary
    lines = manifest_lines(s3, summary)
    assert sorted(line["prompt"] for line in lines) == sorted(prompts)
    failed = {line["prompt"]: line["error_type"] for line in lines if line["kind"] == "failure"}
    assert failed == dict.fromkeys(unknown, "submit_outcome_unknown")
    staged = set(objects(s3, bucket, "runs/"))
    uris = [line["s3_uri"] for line in lines if line["kind"] == "image"]
    assert {uri.removeprefix(f"s3://{bucket}/") for uri in uris} <= staged


def test_two_batches_at_once_submit_each_request_once(
    services: Services, fal_emulator: FalEmulator, s3_bucket: str, start: Start, tmp_path: Path
) -> None:
    """Two machines start at the same moment on files sharing 10 of 20 rows: 30 requests are
    paid, none twice; all 30 images are staged and both manifests are complete."""
    unique = uuid.uuid4().hex[:10]
    files = prompt_files(tmp_path, unique)
    fal_emulator.set_latency(0.5)
    # fal answers the shared rows' submits late: the first machine holds their locks meanwhile,
    # so the second one, arriving then, waits for its handle instead of finding the cache warm
    fal_emulator.inject(Fault("submit", "slow", count=None, match=f"{unique}:shared:", delay=0.5))
    before = fal_emulator.stats
    started = time.monotonic()
    runs = [
        start(batch_command(path, s3_bucket), machine_env(services, name, tmp_path))
        for name, path in (("a", files.a), ("b", files.b))
    ]
    summaries = [finish(proc) for proc in runs]
    elapsed = time.monotonic() - started
    after = fal_emulator.stats
    counts = accepted_by_prompt(fal_emulator, unique)
    print(
        f"\ntwo batches at once in {elapsed:.1f} s: accepted {after.accepted - before.accepted}, "
        f"duplicate submits {after.duplicate_submits - before.duplicate_submits}, "
        f"submitted per machine {[s['submitted'] for s in summaries]}"
    )
    assert after.accepted - before.accepted == 30
    assert after.duplicate_submits - before.duplicate_submits == 0
    assert len(counts) == 30 and set(counts.values()) == {1}
    assert sum(s["submitted"] for s in summaries) == 30
    # really at the same time: each machine's own rows were at fal while the other's were
    infos = [r for r in fal_emulator.requests() if unique in str(r.arguments.get("prompt"))]
    spans = [
        [r.submitted_at for r in infos if str(r.arguments["prompt"]) in only]
        for only in (files.only_a, files.only_b)
    ]
    assert max(min(s) for s in spans) < min(max(s) for s in spans), spans
    images = [k for k in objects(services.s3, s3_bucket, "runs/") if "/manifests/" not in k]
    assert len(images) == 30
    assert [s["failures"] for s in summaries] == [[], []]
    assert_complete(services.s3, summaries[0], files.prompts_a, s3_bucket)
    assert_complete(services.s3, summaries[1], files.prompts_b, s3_bucket)


def record_keys(path: Path) -> list[tuple[str, str]]:
    """For each row of the file: the objects of its submit intent and of its submit record."""
    from prefect_gptimage.prompts import load_prompt_file
    from prefect_gptimage.tasks.cache import submit_cache_key
    from prefect_gptimage.tasks.intents import intent_key

    return [
        (
            f"{RESULTS_FOLDER}/{intent_key(row.request, row.variant)}",
            f"{RESULTS_FOLDER}/{submit_cache_key(row.request, row.variant)}",
        )
        for row in load_prompt_file(path)
    ]


def submits_in_progress(services: Services, keys: list[tuple[str, str]]) -> list[str]:
    """What a kill now could leave half done: Redis locks held, and rows whose submit intent is
    written but not their submit record (sent to fal, fal's answer not stored yet)."""
    from redis import Redis

    with Redis.from_url(services.redis.url) as redis:
        busy = [f"redis {k!r}" for k in redis.keys("lock:*")]
    stored = set(objects(services.s3, services.results_bucket, RESULTS_FOLDER + "/"))
    return busy + [intent for intent, record in keys if intent in stored and record not in stored]


def test_a_batch_killed_half_way_and_restarted_pays_nothing_twice(
    services: Services, fal_emulator: FalEmulator, s3_bucket: str, start: Start, tmp_path: Path
) -> None:
    """The same two machines; one is killed with SIGKILL half way through its file while the
    other runs on, then restarted with the same command. Nothing is submitted twice, and both
    manifests are complete."""
    unique = uuid.uuid4().hex[:10]
    files = prompt_files(tmp_path, unique)
    keys_a = record_keys(files.a)
    fal_emulator.set_latency(0.5)
    # The late rows stay queued at fal until released. The early ones finish; then each machine
    # has its 4 slots waiting on late requests, and submits nothing more: the kill lands there,
    # half way, with no submit under way (none between its intent and its record).
    late = [
        fal_emulator.inject(Fault("status", "stuck", count=None, match=f"{unique}:{group}:late"))
        for group in ("shared", "a", "b")
    ]
    before = fal_emulator.stats
    started = time.monotonic()
    env_a = machine_env(services, "a", tmp_path)
    command_a = batch_command(files.a, s3_bucket)
    first_a = start(command_a, env_a)
    run_b = start(batch_command(files.b, s3_bucket), machine_env(services, "b", tmp_path))
    own_early = [p for p in files.only_a if ":early " in p]
    late_a = [p for p in files.prompts_a if ":late " in p]
    try:
        # Events, not a quiet time: machine a has sent all its own early rows and has at least
        # CONCURRENCY late rows of its file at fal; since fal last accepted anything, the late
        # requests were polled 2 x CONCURRENCY times (the machines' own pace: slower when the
        # machine is loaded) with nothing else sent; and no lock is held, no intent lacks its
        # record.
        deadline, seen, polls_then = time.monotonic() + 240, -1, 0
        while first_a.poll() is None:
            assert time.monotonic() < deadline, "machine a never settled on its late rows"
            accepted, polls = fal_emulator.stats.accepted, sum(f.fired for f in late)
            if accepted != seen:
                seen, polls_then = accepted, polls
            elif polls - polls_then >= 2 * CONCURRENCY:
                counts = accepted_by_prompt(fal_emulator, unique)
                settled = all(counts[p] for p in own_early)
                settled = settled and sum(counts[p] for p in late_a) >= CONCURRENCY
                if settled and not submits_in_progress(services, keys_a):
                    break
                polls_then = polls
            time.sleep(0.05)
        os.kill(first_a.pid, signal.SIGKILL)
    finally:
        first_a.wait(timeout=30)
        fal_emulator.clear_faults()
    assert first_a.returncode == -signal.SIGKILL, "the run ended before it was killed"
    at_kill = accepted_by_prompt(fal_emulator, unique)
    accepted_a = sum(at_kill[p] for p in files.prompts_a)
    assert CONCURRENCY <= accepted_a < 20  # half way

    killed_at = time.monotonic() - started
    second_a = start(command_a, env_a)  # the same command on the same machine
    summary_a = finish(second_a, ok=False)
    summary_b = finish(run_b)
    after = fal_emulator.stats
    counts = accepted_by_prompt(fal_emulator, unique)
    print(
        f"\nkilled at {killed_at:.1f} s with {accepted_a} of its 20 rows accepted; all done at "
        f"{time.monotonic() - started:.1f} s; the restart submitted {summary_a['submitted']}, "
        f"the other machine {summary_b['submitted']}; accepted {after.accepted - before.accepted}"
        f", duplicate submits {after.duplicate_submits - before.duplicate_submits}"
    )
    assert after.duplicate_submits - before.duplicate_submits == 0
    assert set(counts.values()) == {1}
    # A kill between fal's answer and its record would leave that row "outcome unknown, possibly
    # billed": listed as such, never paid again. The kill point above avoids it: such a kill
    # would also leave that request's Redis lock held, holding up the restart for its lease.
    unknown = [f for f in summary_a["failures"] if f["error_type"] == "submit_outcome_unknown"]
    assert summary_a["failures"] == unknown
    assert summary_a["returncode"] == (1 if unknown else 0)
    never_sent = sum(counts[f["prompt"]] == 0 for f in unknown)
    assert after.accepted - before.accepted == 30 - never_sent
    assert summary_a["submitted"] <= 20 - accepted_a  # what was submitted was resumed, not paid
    assert unknown or summary_a["submitted"] > 0  # a late row of its own was never sent
    unknown_prompts = frozenset(f["prompt"] for f in unknown)
    assert_complete(services.s3, summary_a, files.prompts_a, s3_bucket, unknown_prompts)
    assert summary_b["failures"] == []
    assert_complete(services.s3, summary_b, files.prompts_b, s3_bucket)
    from redis import Redis

    with Redis.from_url(services.redis.url) as redis:
        assert redis.keys("lock:*") == []  # the killed machine left no lock behind
