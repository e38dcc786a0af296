"""Fan-out (issue 9, items 3 to 5): one batch, its rows on a Dask cluster of worker processes.

Worker processes stand in for machines: each is a ``dask worker`` with its own ``PREFECT_HOME``,
in its own process group (so that ``kill -9`` takes the whole "machine", nanny and worker).
They share one real ``prefect server`` (on PostgreSQL when it is installed), S3 result storage
through ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`` (an S3Bucket block on moto's server) and a
global concurrency limit of 3. The batch runs as a user runs it: ``prefect-gptimage batch
--cluster``. The fal emulator's request timings show how many requests ran at fal at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import start_cli_process
from prefect import flow
from real_services import PrefectServer, free_port

from prefect_gptimage.errors import ConfigurationError
from prefect_gptimage.testing import FalEmulator

pytest.importorskip("prefect_dask")

CAP = 3  # the global concurrency limit: requests running at fal across every worker
ROWS = 24
#: Threads of each worker ("machine"): 4 rows at once for 3 slots, so the limit binds. The worker
#: the kill test kills has one thread, so it holds at most one slot when it dies: a killed
#: worker's slots stay leased on the server until the lease runs out (about 75 s), and the other
#: worker goes on with the rest.
THREADS = {"worker-0": 1, "worker-1": 3}
FINISHED = "Finished in state Completed()"


def machine_env(server: PrefectServer, **extra: str) -> dict[str, str]:
    """A process on its own "machine": a fresh Prefect home, the shared server, the emulator and
    moto (FAL_*, SSL_CERT_FILE, AWS_* from the session's environment), no other Prefect setting."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") or k.startswith("PREFECT_GPTIMAGE_")
    }
    env.pop("PREFECT_GPTIMAGE_LOCK_URL", None)
    env.update(
        PREFECT_HOME=tempfile.mkdtemp(prefix="gptimage-fanout-"),
        PREFECT_API_URL=server.api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    env.update(extra)
    return env


class Cluster:
    """A ``dask scheduler`` and worker processes, each worker in its own process group."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.folder / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start(
        self, threads: dict[str, int], scheduler_env: dict[str, str] | None = None
    ) -> Cluster:
        scheduler = ["distributed.cli.dask_scheduler", "--host", "127.0.0.1"]
        args = [*scheduler, "--port", str(self.port), "--no-dashboard"]
        self._spawn("scheduler", args, {**self.env, **(scheduler_env or {})})
        for name, count in threads.items():
            args = ["distributed.cli.dask_worker", self.address, "--name", name]
            args += ["--nthreads", str(count), "--nworkers", "1", "--no-dashboard"]
            env = {**self.env, "PREFECT_HOME": tempfile.mkdtemp(prefix=f"gptimage-{name}-")}
            env["DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"] = "False"  # can deadlock on 3.11
            self.workers[name] = self._spawn(name, args, env)
        deadline = time.monotonic() + 180  # process starts: slow on a loaded machine
        while time.monotonic() < deadline:
            if all("Registered to:" in self.log(n) for n in self.workers):
                return self
            time.sleep(0.1)
        raise AssertionError("the Dask workers did not join:\n" + self.log("scheduler"))

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def finished(self, name: str) -> int:
        """Row task runs this worker finished (Prefect logs each task run's end)."""
        return sum(
            1
            for line in self.log(name).splitlines()
            if "Task run 'row " in line and FINISHED in line
        )

    def kill(self, name: str) -> None:
        """``kill -9`` of the whole "machine": the nanny and its worker process."""
        os.killpg(self.workers[name].pid, signal.SIGKILL)
        self.workers[name].wait(10)

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def results_block(prefect_server: PrefectServer, local_s3: Any, s3_bucket: str) -> str:
    """Shared result storage: an S3Bucket block on the server (saved as an operator would)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_aws import AwsCredentials, S3Bucket

    name = f"fanout-results-{uuid.uuid4().hex[:8]}"
    credentials = AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        aws_client_parameters={"endpoint_url": local_s3.endpoint_url},
    )
    block = S3Bucket(
        bucket_name=s3_bucket, bucket_folder="prefect-results", credentials=credentials
    )
    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
        block.save(name, overwrite=True)
    return f"s3-bucket/{name}"


@pytest.fixture
def limit(prefect_server: PrefectServer) -> Iterator[str]:
    """A global concurrency limit of CAP on the server, under a name of this test's own (a killed
    worker's slots stay leased for about 75 s: no other test must share them)."""
    name = f"fal-fanout-{uuid.uuid4().hex[:8]}"
    answer = httpx.post(
        f"{prefect_server.api_url}/v2/concurrency_limits/", json={"name": name, "limit": CAP}
    )
    assert answer.status_code == 201, answer.text
    yield name
    httpx.delete(f"{prefect_server.api_url}/v2/concurrency_limits/{name}")


@pytest.fixture
def cluster(
    prefect_server: PrefectServer, limit: str, tmp_path: Path, local_s3: Any
) -> Iterator[Cluster]:
    env = machine_env(prefect_server, PREFECT_GPTIMAGE_CONCURRENCY_LIMIT_NAME=limit)
    running = Cluster(tmp_path, env).start(THREADS)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def fragile_cluster(
    prefect_server: PrefectServer, limit: str, tmp_path: Path, local_s3: Any
) -> Iterator[Cluster]:
    """The same cluster, whose scheduler gives up on a task the first time a worker running it
    dies (distributed's ``allowed-failures`` 0, 3 by default): a kill ends rows in KilledWorker."""
    env = machine_env(prefect_server, PREFECT_GPTIMAGE_CONCURRENCY_LIMIT_NAME=limit)
    fragile = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    running = Cluster(tmp_path, env).start(THREADS, scheduler_env=fragile)
    try:
        yield running
    finally:
        running.stop()


def prompt_file(path: Path, tag: str) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for i in range(ROWS):
            row = {"prompt": f"fan-out row {i:02d} {tag}: a paper lantern", "quality": "low"}
            fh.write(json.dumps(row) + "\n")
    return path


def start_batch(
    file: Path, bucket: str, cluster: Cluster, env: dict[str, str], out: Path
) -> subprocess.Popen[str]:
    args = ["batch", str(file), "--bucket", bucket, "--prefix", "fanout", "--json", "--verbose"]
    args += ["--concurrency", str(CAP), "--cluster", cluster.address, "--output-dir", str(out)]
    return start_cli_process(args, env)


def finish(batch: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    """The batch's JSON summary and its log."""
    out, err = batch.communicate(timeout=240)
    assert batch.returncode == 0, err[-4000:]
    summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return summary, err


def peak_running(emulator: FalEmulator, tag: str) -> int:
    """The most requests of this batch running at fal at one moment (from their timings)."""
    events: list[tuple[float, int]] = []
    for info in emulator.requests():
        if tag in str(info.arguments.get("prompt")) and info.started_at is not None:
            events.append((info.started_at, 1))
            events.append((info.completed_at or time.time(), -1))
    running = peak = 0
    for _, step in sorted(events):  # an end before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


def check_batch(
    summary: dict[str, Any], emulator: FalEmulator, before: Any, s3: Any, bucket: str, tag: str
) -> None:
    """One complete manifest, every image staged once, every request paid once, cap held."""
    after = emulator.stats
    assert summary["failures"] == [] and len(summary["images"]) == ROWS
    assert after["accepted"] - before["accepted"] == ROWS
    assert after["duplicate_submits"] - before["duplicate_submits"] == 0
    assert peak_running(emulator, tag) <= CAP
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    listed = client.list_objects_v2(Bucket=bucket, Prefix="fanout/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    images = [k for k in keys if not k.endswith(".jsonl")]
    assert len(images) == ROWS == len({i["s3_uri"] for i in summary["images"]})
    manifest_uri = summary["manifest_uri"]
    assert manifest_uri.startswith(f"s3://{bucket}/")
    body = client.get_object(Bucket=bucket, Key=manifest_uri.split("/", 3)[3])["Body"].read()
    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
    assert len(lines) == ROWS and {line["s3_uri"] for line in lines} == {
        f"s3://{bucket}/{k}" for k in images
    }


@pytest.mark.timeout(900)  # a cluster and a batch of processes, loaded
def test_fanned_out_batch_holds_the_cap_and_writes_one_manifest(
    fal_emulator: FalEmulator,
    prefect_server: PrefectServer,
    cluster: Cluster,
    results_block: str,
    limit: str,
    local_s3: Any,
    s3_bucket: str,
    tmp_path: Path,
    unique: str,
) -> None:
    """24 rows over 2 worker processes: at most 3 running at fal at once (the global limit),
    rows run on both workers, one manifest with every row, every request paid once."""
    # 1 s at fal: long enough that rows overlap there even when a loaded machine sends them
    # slowly (the peak is read from fal's own timings)
    fal_emulator.set_latency(1.0)
    env = machine_env(
        prefect_server,
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=results_block,
        PREFECT_GPTIMAGE_CONCURRENCY_LIMIT_NAME=limit,
    )
    before = fal_emulator.stats
    file = prompt_file(tmp_path / "rows.jsonl", unique)
    summary, log = finish(start_batch(file, s3_bucket, cluster, env, tmp_path / "out"))
    check_batch(summary, fal_emulator, before, local_s3, s3_bucket, unique)
    assert 2 <= peak_running(fal_emulator, unique) <= CAP  # rows overlapped; the limit held
    assert "fanning rows out to" in log and "no global concurrency limit" not in log
    assert "results are stored on this machine's disk" not in log  # the S3 block is seen
    assert "statistical profiler" not in log and "cannot run a row" not in log  # workers fit
    done = {name: cluster.finished(name) for name in cluster.workers}
    print(f"backend {prefect_server.backend}; rows finished per worker: {done}")
    assert sum(done.values()) == ROWS and all(done.values()), done


def submitted_by(cluster: Cluster, name: str) -> list[str]:
    """The fal request ids this worker submitted, in order (logged once each is recorded)."""
    ids = []
    for line in cluster.log(name).splitlines():
        if "Task run 'row " in line and " - submitted " in line:
            ids.append(line.split(" - submitted ", 1)[1].split()[0])
    return ids


def kill_while_at_fal(
    batch: subprocess.Popen[str], cluster: Cluster, victim: str, emulator: FalEmulator, before: Any
) -> str:
    """Kill ``victim`` half way, at a moment when its one thread waits at fal on a request whose
    submit is recorded (logged after its intent is written): never in the middle of a submit.
    Returns that request's id."""
    deadline = time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline and batch.poll() is None, "no moment to kill"
        mine = submitted_by(cluster, victim)
        accepted = emulator.stats["accepted"] - before["accepted"]
        if mine and accepted >= ROWS // 3:
            info = emulator.request(mine[-1])
            if info is not None and info.status == "IN_PROGRESS":
                cluster.kill(victim)
                return mine[-1]
        time.sleep(0.02)


@pytest.mark.timeout(900)  # a cluster and a batch of processes, loaded
def test_a_worker_killed_half_way_its_rows_finish_elsewhere(
    fal_emulator: FalEmulator,
    prefect_server: PrefectServer,
    cluster: Cluster,
    results_block: str,
    limit: str,
    local_s3: Any,
    s3_bucket: str,
    tmp_path: Path,
    unique: str,
) -> None:
    """kill -9 of one worker ("machine") while its row waits at fal: Dask reschedules the row on
    the other worker, which resumes that fal request from the shared cache; every image staged
    once, every request paid once, one complete manifest, the limit held throughout."""
    fal_emulator.set_latency(0.5)
    env = machine_env(
        prefect_server,
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=results_block,
        PREFECT_GPTIMAGE_CONCURRENCY_LIMIT_NAME=limit,
    )
    before = fal_emulator.stats
    file = prompt_file(tmp_path / "rows.jsonl", unique)
    batch = start_batch(file, s3_bucket, cluster, env, tmp_path / "out")
    victim, survivor = "worker-0", "worker-1"
    in_flight = kill_while_at_fal(batch, cluster, victim, fal_emulator, before)
    done_by_victim = cluster.finished(victim)
    summary, _ = finish(batch)
    check_batch(summary, fal_emulator, before, local_s3, s3_bucket, unique)
    # its row finished elsewhere, from the request the victim had submitted: that request was
    # delivered, and (check_batch) fal accepted every prompt once, so it was resumed, not re-sent
    assert in_flight in {image["request_id"] for image in summary["images"]}
    assert cluster.finished(survivor) >= ROWS - done_by_victim
    print(f"killed {victim} after {done_by_victim} row(s), with {in_flight} at fal")


@pytest.mark.timeout(900)  # two batches; a loaded machine's server start alone can take 60 s
def test_a_row_dask_gives_up_on_fails_and_a_rerun_resumes_it(
    fal_emulator: FalEmulator,
    prefect_server: PrefectServer,
    fragile_cluster: Cluster,
    results_block: str,
    limit: str,
    local_s3: Any,
    s3_bucket: str,
    tmp_path: Path,
    unique: str,
) -> None:
    """kill -9 of a worker whose row waits at fal, on a scheduler that gives up at once: Dask
    ends that row (and any other the worker held) with ``KilledWorker`` and no Prefect state.
    The batch still ends, reports exactly those rows as failed (not "Running" forever), stages
    the rest; a re-run resumes the paid request from the shared cache: every request paid once."""
    fal_emulator.set_latency(0.5)
    env = machine_env(
        prefect_server,
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=results_block,
        PREFECT_GPTIMAGE_CONCURRENCY_LIMIT_NAME=limit,
    )
    before = fal_emulator.stats
    file = prompt_file(tmp_path / "rows.jsonl", unique)
    batch = start_batch(file, s3_bucket, fragile_cluster, env, tmp_path / "out")
    in_flight = kill_while_at_fal(batch, fragile_cluster, "worker-0", fal_emulator, before)
    out, err = batch.communicate(timeout=240)
    assert batch.returncode != 0, err[-4000:]  # some rows failed
    first: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    failures = first["failures"]
    # the worker's one running row, and at most one more it had been handed
    assert 1 <= len(failures) <= 2, failures
    assert all("KilledWorker" in f["reason"] for f in failures), failures
    info = fal_emulator.request(in_flight)
    assert info is not None
    assert info.arguments["prompt"] in {f["prompt"] for f in failures}
    assert len(first["images"]) == ROWS - len(failures)
    print(f"KilledWorker: {len(failures)} row(s), {in_flight} at fal among them")
    # the re-run: only what was not paid yet is submitted; the killed row's request resumes
    summary, _ = finish(start_batch(file, s3_bucket, fragile_cluster, env, tmp_path / "out2"))
    check_batch(summary, fal_emulator, before, local_s3, s3_bucket, unique)
    assert in_flight in {i["request_id"] for i in summary["images"]}  # its image, fetched now


_LOCK = threading.Lock()  # a module global no process can send to another


@flow(name="gptimage-fanout-unpicklable")
def guarded_flow() -> str:
    """A flow naming a lock. A flow's function is pickled by value (the module's name for it is
    the flow, not the function), with the globals it names: it cannot travel to a worker."""
    from prefect_gptimage.flows._fanout import check_cluster

    with _LOCK:
        try:
            check_cluster("tcp://127.0.0.1:9", logging.getLogger("test-fanout"))
        except ConfigurationError as exc:
            return str(exc)
    return "accepted"


def test_a_flow_that_cannot_travel_is_refused_before_the_cluster_is_asked() -> None:
    """prefect-dask sends the flow run's context with every row: check_cluster pickles it once,
    before it connects (port 9 answers nothing) and before anything is paid."""
    refused = guarded_flow()
    assert "cannot be pickled" in refused and "_thread.lock" in refused, refused
