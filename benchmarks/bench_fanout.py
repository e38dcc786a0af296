"""Benchmark a fanned-out batch: rows/s with 1 and 2 Dask worker processes, offline.

Each configuration runs ``prefect-gptimage batch FILE --cluster tcp://... --concurrency C`` as
a user would; configuration ``0`` (the baseline, run first in the same invocation) runs the
same batch without ``--cluster``, on the flow process's own thread pool. Every line carries
``ratio_to_baseline`` (rows/s over the baseline's rows/s, rows phase), so a figure is read
against a baseline measured on the same machine under the same load. They run against:

* the bundled fal emulator (its own process; ``--latency`` seconds per request, account limit
  ``--limit``) and moto's S3 server (its own process, ``bench_batch.py --serve-s3``);
* one real ``prefect server`` on PostgreSQL (started once, reused by every configuration:
  a warm server), with a global concurrency limit of ``--limit`` (a new one per configuration)
  and result storage in S3 through ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`` (a new folder per
  configuration, so no configuration finds another's cache);
* a ``dask scheduler`` and N ``dask worker`` processes (``--threads`` threads each, each with a
  fresh ``PREFECT_HOME``, Dask's profiler off), started anew for each configuration; rows go
  through prefect-dask's ``DaskTaskRunner`` (see ``prefect_gptimage/flows/_fanout.py``).

The flow process gets a fresh ``PREFECT_HOME`` each time (a real server: nothing of it is
warmed). Per configuration it prints ONE JSON line with:

* wall seconds of the command and rows/s; the rows phase (the batch's own elapsed time, from
  its progress start to its last row, without the command's start-up) and its rows/s;
* peak RSS of each worker process and of the flow process; CPU seconds of the flow process
  and of each worker, and per row (where a configuration spends its CPU);
* fal counters: accepted, duplicate submits, peak running;
* the task runs the server dropped: the task runs a batch makes (3 per uncached row: the row,
  its submit, its fetch) minus the task runs the server has for that flow run in a final
  state, 15 s after the batch ended, and again once that count stops changing (a server behind
  on its events catches up: only what is still missing then was dropped, up to ``--settle``
  seconds); and the lines of the server's log saying it dropped an event;
* the load average before and after.

Usage::

    .venv/bin/python benchmarks/bench_fanout.py --rows 2000 --latency 0.3 --limit 64 \\
        --workers 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))  # real_services: the suite's service launchers

from bench_batch import Emulator, S3Server, _children_map, _rss_bytes, package_digest  # noqa: E402

TASK_RUNS_PER_ROW = 3  # generate_and_stage, submit_request, fetch_result
DROPPED_LINE = "dropping message"


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("prefect", "prefect-dask", "distributed", "fal-client", "prefect-aws", "moto")
    return {"python": platform.python_version()} | {n: version(n) for n in names}


def write_prompts(path: Path, rows: int, tag: str) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            row = {
                "prompt": f"fan-out benchmark {tag} row {i:06d}: a watercolour harbour at dawn",
                "quality": "low",
                "image_size": "1024x1024",
                "output_format": "jpeg",
            }
            fh.write(json.dumps(row) + "\n")


class Peak:
    """Samples the RSS of processes (and their children) every 0.2 s; keeps each one's peak."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids, self.peak = pids, dict.fromkeys(pids, 0)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.2):
            tree = _children_map()
            for name, pid in self.pids.items():
                # a dask worker is the nanny's child: count the largest process under the name
                todo, largest = [pid], 0
                while todo:
                    p = todo.pop()
                    largest = max(largest, _rss_bytes(p))
                    todo.extend(tree.get(p, ()))
                self.peak[name] = max(self.peak[name], largest)

    def stop(self) -> dict[str, float]:
        self._done.set()
        self._thread.join()
        return {k: round(v / 2**20, 1) for k, v in self.peak.items()}


def api(server: Any, method: str, route: str, body: Any = None) -> Any:
    import httpx

    answer = httpx.request(method, f"{server.api_url}/{route}", json=body, timeout=60)
    answer.raise_for_status()
    return answer.json() if answer.content else None


def save_results_block(server: Any, s3: S3Server, bucket: str, folder: str) -> str:
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_aws import AwsCredentials, S3Bucket

    name = f"bench-results-{uuid.uuid4().hex[:8]}"
    credentials = AwsCredentials(
        aws_access_key_id=s3.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3.env["AWS_SECRET_ACCESS_KEY"],
        region_name=s3.env["AWS_DEFAULT_REGION"],
        aws_client_parameters={"endpoint_url": s3.env["AWS_ENDPOINT_URL_S3"]},
    )
    block = S3Bucket(bucket_name=bucket, bucket_folder=folder, credentials=credentials)
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        block.save(name, overwrite=True)
    return f"s3-bucket/{name}"


def start_cluster(
    workers: int, threads: int, env: dict[str, str], logs: Path
) -> tuple[str, list[subprocess.Popen[bytes]], dict[str, int]]:
    from real_services import free_port

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = []

    def spawn(name: str, args: list[str], extra: dict[str, str]) -> subprocess.Popen[bytes]:
        with (logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", *args],
                env={**env, **extra},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(proc)
        return proc

    scheduler = ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port)]
    spawn("scheduler", [*scheduler, "--no-dashboard"], {})
    pids = {}
    for i in range(workers):
        name = f"worker-{i}"
        args = ["distributed.cli.dask_worker", address, "--name", name, "--no-dashboard"]
        args += ["--nthreads", str(threads), "--nworkers", "1"]
        home = tempfile.mkdtemp(prefix=f"bench-{name}-")
        pids[name] = spawn(name, args, {"PREFECT_HOME": home}).pid
    deadline = time.monotonic() + 120
    while not all("Registered to:" in (logs / f"{n}.log").read_text() for n in pids):
        if time.monotonic() > deadline:
            raise RuntimeError("the Dask workers did not join")
        time.sleep(0.2)
    return address, procs, pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants still running (from /proc)."""
    tree, total, todo = _children_map(), 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
        except (OSError, ValueError, IndexError):
            pass
        todo.extend(tree.get(p, ()))
    return total / os.sysconf("SC_CLK_TCK")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def dropped_lines(server: Any) -> int:
    """Lines of the server's log (all its life) saying it dropped an event."""
    return (server.home / "server.log").read_text(errors="replace").count(DROPPED_LINE)


def batch_seconds(log: str) -> float | None:
    """The batch's own elapsed time (rows phase: from its progress start to its last row),
    from its final progress line ``N/N (100.0%), 1m05s elapsed, done``."""
    found = re.findall(r"\(100\.0%\), (?:(\d+)h)?(?:(\d+)m)?(\d+)s elapsed, done", log)
    if not found:
        return None
    hours, minutes, secs = (int(x or 0) for x in found[-1])
    return float(hours * 3600 + minutes * 60 + secs)


def task_runs(server: Any, flow_name: str) -> tuple[int, int]:
    """(row task runs, those in a final state) of the newest run of ``flow_name``: the task runs
    named ``row: ...``, ``submit ...`` and ``fetch ...`` (the flow's own few tasks left out)."""
    runs = api(
        server,
        "POST",
        "flow_runs/filter",
        {"flows": {"name": {"any_": [flow_name]}}, "sort": "START_TIME_DESC", "limit": 1},
    )
    flow_run = {"flow_runs": {"id": {"any_": [runs[0]["id"]]}}}
    total = final = 0
    for name in ("row: ", "submit ", "fetch "):
        named: dict[str, Any] = {"name": {"like_": name}}
        total += int(api(server, "POST", "task_runs/count", flow_run | {"task_runs": named}))
        done = named | {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}}
        final += int(api(server, "POST", "task_runs/count", flow_run | {"task_runs": done}))
    return total, final


def run_config(
    n_workers: int,
    args: argparse.Namespace,
    base: dict[str, str],
    server: Any,
    s3: S3Server,
    emulator: Emulator,
    logs: Path,
) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    folder = logs / f"workers-{n_workers}-{tag}"
    folder.mkdir()
    limit = f"bench-fal-{tag}"
    api(server, "POST", "v2/concurrency_limits/", {"name": limit, "limit": args.limit})
    results = save_results_block(server, s3, args.bucket, f"results-{tag}")
    env = {
        **base,
        "PREFECT_GPTIMAGE_CONCURRENCY_LIMIT_NAME": limit,
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": results,
    }
    if n_workers == 0:  # the baseline: the flow process's own threads, no cluster
        return measure(0, args, env, None, {}, server, emulator, folder, tag)
    address, procs, pids = start_cluster(n_workers, args.threads, env, folder)
    try:
        return measure(n_workers, args, env, address, pids, server, emulator, folder, tag)
    finally:
        stop(procs)


def measure(
    n_workers: int,
    args: argparse.Namespace,
    env: dict[str, str],
    address: str | None,
    pids: dict[str, int],
    server: Any,
    emulator: Emulator,
    folder: Path,
    tag: str,
) -> dict[str, Any]:
    prompts = folder / "rows.jsonl"
    write_prompts(prompts, args.rows, tag)
    command = [sys.executable, "-m", "prefect_gptimage.cli", "batch", str(prompts)]
    command += ["--bucket", args.bucket, "--prefix", f"bench-{tag}", "--json"]
    command += ["--concurrency", str(args.limit)]
    command += ["--cluster", address] if address else []
    command += ["--output-dir", str(folder / "out")]
    flow_env = {**env, "PREFECT_HOME": tempfile.mkdtemp(prefix="bench-flow-")}
    emulator.reset()
    dropped_before = dropped_lines(server)
    load_before = os.getloadavg()
    workers_cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    children_before = os.times()
    started = time.monotonic()
    with (folder / "batch.out").open("w") as out, (folder / "batch.err").open("w") as err:
        batch = subprocess.Popen(command, env=flow_env, stdout=out, stderr=err)
        peak = Peak({**pids, "flow": batch.pid})
        try:
            returncode = batch.wait(args.timeout)
        except BaseException:  # interrupted, or over time: stop the batch too
            batch.terminate()
            batch.wait(30)
            raise
    seconds = time.monotonic() - started
    children_after = os.times()  # the batch was waited for: its CPU is in the children's times
    flow_cpu = (children_after.children_user - children_before.children_user) + (
        children_after.children_system - children_before.children_system
    )
    workers_cpu = {n: cpu_seconds(p) - workers_cpu_before[n] for n, p in pids.items()}
    rss = peak.stop()
    load_after = os.getloadavg()
    stats = emulator.stats()
    summary = json.loads((folder / "batch.out").read_text().strip().splitlines()[-1])
    rows_phase = batch_seconds((folder / "batch.err").read_text(errors="replace"))
    time.sleep(15)  # let the server record the last events before counting
    recorded, final = task_runs(server, "gptimage-batch-to-s3")
    # a server behind on its events catches up later: count again until nothing changes
    settled, waited, last = final, 15.0, None
    while settled != last and waited < args.settle:
        time.sleep(10)
        waited += 10
        last, (_, settled) = settled, task_runs(server, "gptimage-batch-to-s3")
    expected = TASK_RUNS_PER_ROW * stats["accepted"]
    rows_ok = int(summary["images_total"])  # (its "images" lists at most 1000)
    return {
        "workers": n_workers,
        "threads_per_worker": args.threads,
        "rows": args.rows,
        "rows_ok": rows_ok,
        "staged": summary["staged"],
        "failures": len(summary["failures"]),
        "returncode": returncode,
        "seconds": round(seconds, 1),
        "rows_per_s": round(rows_ok / seconds, 2),
        "rows_phase_s": rows_phase,
        "rows_per_s_rows_phase": round(rows_ok / rows_phase, 2) if rows_phase else None,
        "peak_rss_mb": rss,
        "flow_cpu_s": round(flow_cpu, 1),
        "flow_cpu_ms_per_row": round(1000 * flow_cpu / max(1, rows_ok), 1),
        "workers_cpu_s": {n: round(c, 1) for n, c in workers_cpu.items()},
        "workers_cpu_ms_per_row": round(1000 * sum(workers_cpu.values()) / max(1, rows_ok), 1),
        "accepted": stats["accepted"],
        "duplicate_submits": stats["duplicate_submits"],
        "max_in_progress": stats["max_in_progress"],
        "task_runs_expected": expected,
        "task_runs_recorded": recorded,
        "task_runs_final": final,
        "task_runs_dropped": expected - final,
        "task_runs_final_settled": settled,
        "task_runs_dropped_settled": expected - settled,
        "settle_s": waited,
        "server_log_dropped_lines": dropped_lines(server) - dropped_before,  # this run's
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.3)
    parser.add_argument("--limit", type=int, default=64, help="fal account limit = the GCL")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="Dask workers per configuration; 0 = the baseline without a cluster (run first)",
    )
    parser.add_argument("--threads", type=int, default=64, help="threads per worker")
    parser.add_argument("--bucket", default="bench-fanout")
    parser.add_argument("--sqlite", action="store_true", help="server on SQLite, not PostgreSQL")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument(
        "--settle", type=float, default=300.0, help="wait at most this long for the server"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop: clean up like Ctrl+C

    from real_services import PostgresServer, PrefectServer

    logs = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    print(f"logs in {logs}", file=sys.stderr, flush=True)
    emulator = Emulator(args.latency, args.limit, logs)
    s3 = S3Server(logs)
    s3.client().create_bucket(Bucket=args.bucket)
    database = None if args.sqlite else PostgresServer().start()
    server = PrefectServer(database).start()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DASK_"))}
    base.update(emulator.env)
    base.update(s3.env)
    base.update(
        FAL_KEY="bench-key-id:bench-key-secret",
        PREFECT_API_URL=server.api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED="False",
    )
    common = {
        "latency_s": args.latency,
        "account_limit": args.limit,
        "global_concurrency_limit": args.limit,
        "image": "1024x1024 jpeg, low quality, 1 per row",
        "server": server.backend,
        "prefect_home": "fresh (flow and workers); server warm across configurations",
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "cores": os.cpu_count(),
        "versions": versions(),
        "package_sources": package_digest(),
        "date": time.strftime("%Y-%m-%d"),
    }
    baseline: float | None = None
    try:
        for n in sorted(args.workers):  # the baseline (0) first
            print(f"[bench] {n} worker(s)...", file=sys.stderr, flush=True)
            line = common | run_config(n, args, base, server, s3, emulator, logs)
            rate = line["rows_per_s_rows_phase"]
            if n == 0:
                baseline = rate
            line["ratio_to_baseline"] = round(rate / baseline, 2) if rate and baseline else None
            print(json.dumps(line), flush=True)
    finally:
        server.stop()
        if database is not None:
            database.stop()
        s3.stop()
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
