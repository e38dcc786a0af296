"""Benchmark ``prefect-gptimage batch`` against a hand-written thread pool, offline.

In one run, with the same prompt file, concurrency, emulated latency and account limit:

1. **raw**: ``benchmarks/raw_baseline.py`` (``ThreadPoolExecutor`` + ``fal_client.subscribe`` +
   httpx + boto3 ``put_object``), as a subprocess;
2. **plugin**: ``prefect-gptimage batch FILE --bucket B --concurrency C --json --output-dir D``
   as a subprocess, against one of three Prefect set-ups (fresh result storage in each, so no
   cache leaks in):

   * default: the temporary API server the CLI starts, on a ``PREFECT_HOME`` whose database was
     created beforehand, untimed, as a user's is (its start and stop are timed);
   * ``--cold-prefect-home``: the same, but the very first run on a brand-new home (database
     creation and migrations timed);
   * ``--prefect-server``: the production case. A real ``prefect server start`` (SQLite, its own
     ``PREFECT_HOME``, a free port) is started after the raw phase, untimed, and the plugin runs
     with ``PREFECT_API_URL`` pointing at it. The server's CPU during each phase is measured
     and is part of the machine's.
3. **cached**: the same plugin command again with the same ``PREFECT_HOME`` (must submit
   nothing).

Each phase reports its wall time, the CPU-seconds of the **whole machine** during the phase
(``/proc/stat`` before and after: the Prefect server's bookkeeping, the emulator, S3 and anything
else running on the machine), the CPU of the phase's own process tree, the CPU of the processes
this benchmark started (phase + emulator + S3 + Prefect server: the machine figure without other
users' work), ``os.getloadavg()`` before and after, and the emulator's call counters (status
calls per request).

The fal emulator (``prefect-gptimage emulator``) and the local S3 server (moto, via
``LocalS3Server``) each run in their **own subprocess**, so neither shares a GIL with the other
or with the client under test; this process only waits. Emulator counters are reset before the
raw and plugin phases (admin API) and diffed around every phase.

Prints ONE JSON line per plugin configuration (see ``benchmarks/README.md`` for every figure)
and exits 0 only if every phase verified: raw put every object in its bucket; plugin exited 0
with every image staged; the cached re-run exited 0 and submitted nothing.

Usage::

    .venv/bin/python benchmarks/bench_batch.py --n 200 --concurrency 16 --latency 3 --limit 16 \\
        --prefect-server
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RAW_SCRIPT = HERE / "raw_baseline.py"
FAL_KEY = "bench-key-id:bench-key-secret"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")
sys.path.insert(0, str(HERE.parent / "tests"))  # real_services: the suite's service launchers


def now() -> str:
    return time.strftime("%H:%M:%S")


def package_digest() -> str:
    """sha256 (12 hex) of the package's sources: which code a figure was measured on."""
    import hashlib

    import prefect_gptimage

    root = Path(prefect_gptimage.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def versions() -> dict[str, str]:
    """Python, Prefect and fal-client versions, and the package sources' digest."""
    from importlib.metadata import version

    return {
        "python": platform.python_version(),
        "prefect": version("prefect"),
        "fal_client": version("fal-client"),
        "prefect_gptimage_sources": package_digest(),
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- helpers run in a subprocess ------------------------------------------------------------


def serve_s3() -> int:
    """``--serve-s3``: run a LocalS3Server, print its env as JSON, serve until stdin closes."""
    from prefect_gptimage.testing.s3 import LocalS3Server

    server = LocalS3Server().start()
    print(json.dumps(server.env()), flush=True)
    sys.stdin.read()  # returns when the parent closes our stdin (or dies); SIGTERM also ends us
    server.stop()
    return 0


# -- process-tree memory sampling ------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def tree_rss(root: int) -> int:
    """Summed RSS of ``root`` and all its descendants right now."""
    tree = _children_map()
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += _rss_bytes(pid)
        todo.extend(tree.get(pid, ()))
    return total


def machine_busy_seconds() -> float:
    """CPU-seconds every core of the machine has spent busy since boot (``/proc/stat``).

    Busy is everything but ``idle`` and ``iowait``; the difference around a phase is what the
    whole machine burnt meanwhile: the process under test, the servers it talks to, and any
    other work on the machine (hence ``bench_cpu_s`` beside it).
    """
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is already counted in user/nice: only the first 8 fields add up
    return (sum(fields[:8]) - idle) / CLK_TCK


def _cpu_ticks(pid: int, with_children: bool) -> int:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            rest = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    # fields 14-17 of proc(5): utime stime cutime cstime (rest[0] is field 3)
    ticks = int(rest[11]) + int(rest[12])
    return ticks + (int(rest[13]) + int(rest[14]) if with_children else 0)


def tree_cpu_seconds(root: int) -> float:
    """CPU-seconds of ``root``, its live descendants and the children it has waited for."""
    tree = _children_map()
    total, todo = _cpu_ticks(root, with_children=True), list(tree.get(root, ()))
    while todo:
        pid = todo.pop()
        total += _cpu_ticks(pid, with_children=True)
        todo.extend(tree.get(pid, ()))
    return total / CLK_TCK


@dataclass
class PhaseResult:
    name: str
    returncode: int
    seconds: float
    cpu_seconds: float
    peak_tree_rss_mb: float  # sampled sum over the process tree
    max_process_rss_mb: float  # ru_maxrss from wait4: the largest single process (exact)
    stdout: str
    log: Path
    stats: dict[str, Any] = field(default_factory=dict)
    timeline: dict[str, Any] = field(default_factory=dict)
    digests: tuple[str, str] = ("", "")  # package sources before and after the phase
    machine_cpu_seconds: float = 0.0  # /proc/stat busy time of every core during the phase
    bench_cpu_seconds: float = 0.0  # phase tree + emulator + S3 + Prefect server
    server_cpu_seconds: float | None = None  # the running Prefect server's, if any
    load: dict[str, list[float]] = field(default_factory=dict)

    @property
    def peak_rss_mb(self) -> float:
        return round(max(self.peak_tree_rss_mb, self.max_process_rss_mb), 1)


def run_measured(
    name: str, cmd: list[str], env: dict[str, str], logs: Path, timeout: float
) -> PhaseResult:
    """Run ``cmd``; wall time, CPU time and peak RSS of it and its children (stdlib only)."""
    out_path, err_path = logs / f"{name}.stdout", logs / f"{name}.stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.2):
                peak = max(peak, tree_rss(proc.pid))
                if time.perf_counter() - started > timeout:
                    proc.kill()

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of the child incl. its waited children
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return PhaseResult(
        name=name,
        returncode=proc.returncode,
        seconds=round(seconds, 2),
        cpu_seconds=round(usage.ru_utime + usage.ru_stime, 2),
        peak_tree_rss_mb=round(peak / 2**20, 1),
        max_process_rss_mb=round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
        stdout=out_path.read_text(encoding="utf-8", errors="replace"),
        log=err_path,
    )


def warm_prefect_home(env: dict[str, str]) -> float:
    """Create and migrate the Prefect home's database (a one-task flow run), untimed: seconds."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "from prefect import flow\nflow(lambda: None)()"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return round(time.perf_counter() - started, 2)


# -- servers ---------------------------------------------------------------------------------


def _read_lines_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> list[str]:
    """Lines the server prints on stdout up to the one containing ``marker``."""
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in iter(stdout.readline, "")], daemon=True
    ).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
        except queue.Empty:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"server did not start; it printed: {seen}") from None
            continue
        seen.append(line.rstrip("\n"))
        if marker in line:
            return seen


def reap(proc: subprocess.Popen[str], timeout: float = 10) -> None:
    """Wait for a server told to stop; kill it if it has not stopped within ``timeout``."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def plugin_command() -> list[str]:
    script = Path(sys.executable).parent / "prefect-gptimage"
    if script.exists():
        return [str(script)]
    found = shutil.which("prefect-gptimage")
    return [found] if found else [sys.executable, "-m", "prefect_gptimage.cli"]


class Emulator:
    """``prefect-gptimage emulator`` in a subprocess, with its admin API."""

    def __init__(self, latency: float, limit: int, logs: Path) -> None:
        self._stderr = (logs / "emulator.stderr").open("w")
        self.proc = subprocess.Popen(
            [
                *plugin_command(),
                "emulator",
                "--port",
                "0",
                "--latency",
                str(latency),
                "--concurrency-limit",
                str(limit),
            ],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.env: dict[str, str] = {}
        for line in _read_lines_until(self.proc, "fal emulator serving", 60):
            if line.startswith("export "):
                key, _, value = line.removeprefix("export ").partition("=")
                self.env[key] = value
        self.base = f"https://{self.env['FAL_QUEUE_RUN_HOST']}/_emulator"
        self._ssl = ssl.create_default_context(cafile=self.env["SSL_CERT_FILE"])

    def _call(self, method: str, route: str) -> Any:
        body = b"{}" if method == "POST" else None
        req = urllib.request.Request(f"{self.base}/{route}", method=method, data=body)
        with urllib.request.urlopen(req, context=self._ssl, timeout=30) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        return dict(self._call("GET", "stats"))

    def requests(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "requests"))

    def reset(self) -> None:
        self._call("POST", "reset")

    def stop(self) -> None:
        self.proc.terminate()
        reap(self.proc)
        self._stderr.close()


class S3Server:
    """``LocalS3Server`` in a subprocess (this script with ``--serve-s3``)."""

    def __init__(self, logs: Path) -> None:
        self._stderr = (logs / "s3.stderr").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve-s3"],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.PIPE,
            text=True,
        )
        self.env: dict[str, str] = json.loads(_read_lines_until(self.proc, "{", 60)[-1])

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.env["AWS_ENDPOINT_URL_S3"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def keys(self, bucket: str, prefix: str) -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # the server's signal to stop
        reap(self.proc)
        self._stderr.close()


# -- the benchmark ---------------------------------------------------------------------------


def write_prompts(path: Path, args: argparse.Namespace) -> None:
    subjects = ("lighthouse", "tram", "koi pond", "kite", "fox", "harbour", "glacier", "orchard")
    with path.open("w", encoding="utf-8") as fh:
        for i in range(args.n):
            row = {
                "prompt": f"benchmark row {i:06d}: a watercolour {subjects[i % len(subjects)]} "
                f"at dawn, study number {i}",
                "quality": args.quality,
                "image_size": args.image_size,
                "output_format": args.output_format,
                "num_images": args.num_images,
            }
            fh.write(json.dumps(row) + "\n")


def diff(before: dict[str, Any], after: dict[str, Any], key: str) -> int:
    return int(after[key]) - int(before[key])


def last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return dict(json.loads(line))
            except json.JSONDecodeError:
                return None
    return None


def timeline(
    requests: list[dict[str, Any]], started: float, seconds: float, limit: int
) -> dict[str, Any]:
    """Where a phase's wall time went at fal, from the emulator's per-request times.

    ``first_submit_s``: launch to the first accepted submit (start-up). ``fal_span_s``: first
    start to last completion. ``slot_use``: the share of the account's ``limit`` slots running
    over that span (1.0: fal never idled). ``tail_s``: last completion to the phase's exit
    (the last result fetched, downloaded and staged, the manifest, shutdown). ``running``: the
    mean number of requests running at fal in each second from launch.
    """
    runs = [r for r in requests if r.get("started_at") and r.get("completed_at")]
    if not runs:
        return {}
    first_submit = min(r["submitted_at"] for r in requests)
    first_start = min(r["started_at"] for r in runs)
    last_done = max(r["completed_at"] for r in runs)
    busy = sum(r["completed_at"] - r["started_at"] for r in runs)
    span = max(last_done - first_start, 1e-9)
    return {
        "first_submit_s": round(first_submit - started, 2),
        "fal_span_s": round(span, 2),
        "slot_use": round(busy / (limit * span), 3),
        "tail_s": round(started + seconds - last_done, 2),
        "running": [
            round(sum(_overlap(r, started + i, started + i + 1) for r in runs), 1)
            for i in range(math.ceil(last_done - started))
        ],
    }


def _overlap(request: dict[str, Any], lo: float, hi: float) -> float:
    return max(0.0, min(hi, request["completed_at"]) - max(lo, request["started_at"]))


def phase(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    emulator: Emulator,
    logs: Path,
    timeout: float,
    reset: bool,
    limit: int,
    services: dict[str, int],
) -> PhaseResult:
    """Run one phase; ``services``: name -> pid of the servers whose CPU is counted with it."""
    if reset:
        emulator.reset()
    before = emulator.stats()
    print(
        f"[bench {now()}] {name}: {' '.join(cmd)}",
        file=sys.stderr,
        flush=True,
    )
    digest = package_digest()
    load_before = loadavg()
    service_cpu = {k: tree_cpu_seconds(pid) for k, pid in services.items()}
    machine_cpu = machine_busy_seconds()
    started_wall = time.time()
    result = run_measured(name, cmd, env, logs, timeout)
    machine_cpu = machine_busy_seconds() - machine_cpu
    service_cpu = {k: tree_cpu_seconds(pid) - service_cpu[k] for k, pid in services.items()}
    result.load = {"before": load_before, "after": loadavg()}
    result.machine_cpu_seconds = round(machine_cpu, 2)
    result.bench_cpu_seconds = round(result.cpu_seconds + sum(service_cpu.values()), 2)
    if "prefect_server" in service_cpu:
        result.server_cpu_seconds = round(service_cpu["prefect_server"], 2)
    result.digests = (digest, package_digest())
    after = emulator.stats()
    result.stats = {
        k: diff(before, after, k)
        for k in ("submit", "status", "status_stream", "result", "media", "accepted")
    }
    result.stats["duplicate_submits"] = diff(before, after, "duplicate_submits")
    result.stats["max_in_progress"] = after["max_in_progress"]  # since the last reset
    if reset:
        result.timeline = timeline(emulator.requests(), started_wall, result.seconds, limit)
    print(
        f"[bench {now()}] {name}: rc={result.returncode} {result.seconds}s "
        f"cpu tree={result.cpu_seconds}s machine={result.machine_cpu_seconds}s "
        f"bench={result.bench_cpu_seconds}s server={result.server_cpu_seconds}s "
        f"load={result.load} "
        f"rss tree={result.peak_tree_rss_mb}MB largest={result.max_process_rss_mb}MB "
        f"calls={result.stats}",
        file=sys.stderr,
        flush=True,
    )
    return result


def ratio(a: float, b: float | None) -> float | None:
    return round(a / b, 3) if b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20, help="prompt rows (default 20)")
    parser.add_argument("--concurrency", type=int, default=8, help="client concurrency")
    parser.add_argument("--latency", type=float, default=0.5, help="emulated generation seconds")
    parser.add_argument("--limit", type=int, default=8, help="emulated fal account limit")
    parser.add_argument("--image-size", default="1536x1024")
    parser.add_argument("--quality", default="low")
    parser.add_argument("--output-format", default="png")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="kill a phase after this many seconds"
    )
    parser.add_argument(
        "--cold-prefect-home",
        action="store_true",
        help="time the plugin's first run on a brand-new PREFECT_HOME (database creation and "
        "migrations included; Prefect's analytics left on) instead of warming it up untimed",
    )
    parser.add_argument(
        "--prefect-server",
        action="store_true",
        help="the production case: start `prefect server start` (SQLite, own PREFECT_HOME, free "
        "port; untimed) after the raw phase and run the plugin with PREFECT_API_URL pointing at it",
    )
    parser.add_argument(
        "--skip-raw", action="store_true", help="profiling aid: run only the plugin phases"
    )
    parser.add_argument(
        "--plugin-wrapper",
        default="",
        metavar="CMD",
        help="profiling aid: prefix the plugin commands ('py-spy record -s -f raw -o F --')",
    )
    parser.add_argument(
        "--plugin-env",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="profiling aid: extra environment for the plugin phases (repeatable)",
    )
    parser.add_argument(
        "--lookahead",
        type=int,
        nargs="+",
        metavar="K",
        help="run the plugin phases once per value with `batch --lookahead K`, each on its own "
        "Prefect home and result storage, all against the one raw phase (one JSON line each)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, images)")
    parser.add_argument("--serve-s3", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_s3:
        return serve_s3()
    if args.prefect_server and args.cold_prefect_home:
        parser.error("--prefect-server and --cold-prefect-home measure different set-ups")
    started_load = loadavg()
    about = versions()

    work = Path(tempfile.mkdtemp(prefix="bench-gptimage-"))
    logs = work / "logs"
    logs.mkdir()
    prompts = work / "prompts.jsonl"
    write_prompts(prompts, args)
    expected_images = args.n * args.num_images
    print(f"[bench {now()}] work dir {work}", file=sys.stderr, flush=True)

    emulator = Emulator(args.latency, args.limit, logs)
    try:
        s3 = S3Server(logs)
    except BaseException:
        emulator.stop()
        raise
    problems: list[str] = []
    runs: list[tuple[int | None, PhaseResult, PhaseResult, float | None]] = []
    services = {"emulator": emulator.proc.pid, "s3": s3.proc.pid}
    api: Any = None
    api_start_s: float | None = None
    try:
        s3.client().create_bucket(Bucket="bench-raw")
        s3.client().create_bucket(Bucket="bench-plugin")
        base_env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "FAL_", "AWS_")) and k != "SSL_CERT_FILE"
        }
        base_env.update(emulator.env)
        base_env.update(s3.env)
        base_env["FAL_KEY"] = FAL_KEY

        raw: PhaseResult | None = None
        if not args.skip_raw:
            raw = phase(
                "raw",
                [
                    sys.executable,
                    str(RAW_SCRIPT),
                    str(prompts),
                    "--bucket",
                    "bench-raw",
                    "--prefix",
                    "raw",
                    "--concurrency",
                    str(args.concurrency),
                ],
                base_env,
                emulator,
                logs,
                args.timeout,
                reset=True,
                limit=args.limit,
                services=services,
            )
            raw_keys = s3.keys("bench-raw", "raw/")
            if raw.returncode != 0 or len(raw_keys) != expected_images:
                problems.append(
                    f"raw: exit {raw.returncode}, {len(raw_keys)}/{expected_images} objects "
                    f"({raw.log})"
                )

        if args.prefect_server:
            # Untimed, after the raw phase (whose machine CPU must not include a Prefect server);
            # then a pause for the server's start-up work (migrations, first service loops) to
            # settle before anything is timed.
            from real_services import PrefectServer

            print(f"[bench {now()}] starting prefect server", file=sys.stderr, flush=True)
            started = time.perf_counter()
            api = PrefectServer().start()
            api_start_s = round(time.perf_counter() - started, 2)
            assert api.proc is not None
            services["prefect_server"] = api.proc.pid
            print(
                f"[bench {now()}] prefect server {api.api_url} answered after {api_start_s}s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(10)

        for lookahead in args.lookahead or [None]:
            plugin_env = dict(base_env)
            tag = "" if lookahead is None else f"-lookahead{lookahead}"
            plugin_env["PREFECT_HOME"] = str(work / f"prefect-home{tag}")
            plugin_env["PREFECT_LOCAL_STORAGE_PATH"] = str(work / f"prefect-results{tag}")
            warmup_s: float | None = None
            if api is not None:
                # The production case: the client's own home needs no database.
                plugin_env["PREFECT_API_URL"] = api.api_url
                plugin_env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
            elif not args.cold_prefect_home:
                # A user's Prefect home already has its database: create and migrate it once,
                # untimed, so the figures are steady state, not first install. Caches live in the
                # run's own result storage, so nothing leaks from one benchmark run to the next.
                # (A dry run no longer starts a Prefect API, so a one-task flow run does it: the
                # temporary API it starts creates and migrates the home's database.)
                plugin_env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
                warmup_s = warm_prefect_home(plugin_env)
                print(f"[bench {now()}] Prefect home warmed up in {warmup_s}s", file=sys.stderr)
            plugin_env["PREFECT_GPTIMAGE_LOCAL_CONCURRENCY"] = str(args.limit)
            # On a loaded machine the temporary API on a fresh home can take longer than
            # Prefect's default 20 s to answer; the CLI's error tells users to raise this. It
            # changes no figure of a run that starts within 20 s.
            plugin_env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
            plugin_env.update(item.split("=", 1) for item in args.plugin_env)
            plugin_cmd = [
                *shlex.split(args.plugin_wrapper),
                *plugin_command(),
                "batch",
                str(prompts),
                "--bucket",
                "bench-plugin",
                "--prefix",
                f"plugin{tag}",
                "--concurrency",
                str(args.concurrency),
                "--json",
                "--output-dir",
                str(work / f"plugin-output{tag}"),
                *([] if lookahead is None else ["--lookahead", str(lookahead)]),
            ]
            plugin = phase(
                "plugin",
                plugin_cmd,
                plugin_env,
                emulator,
                logs,
                args.timeout,
                reset=True,
                limit=args.limit,
                services=services,
            )
            summary = last_json(plugin.stdout) or {}
            image_keys = [
                k
                for k in s3.keys("bench-plugin", f"plugin{tag}/")
                if k.endswith("." + args.output_format.replace("jpeg", "jpg"))
            ]
            if (
                plugin.returncode != 0
                or summary.get("staged") != expected_images
                or len(image_keys) < expected_images
            ):
                problems.append(
                    f"plugin: exit {plugin.returncode}, staged {summary.get('staged')}/"
                    f"{expected_images}, {len(image_keys)} image objects ({plugin.log})"
                )

            cached = phase(
                "cached",
                plugin_cmd,
                plugin_env,
                emulator,
                logs,
                args.timeout,
                reset=False,
                limit=args.limit,
                services=services,
            )
            cached_summary = last_json(cached.stdout) or {}
            if (
                cached.returncode != 0
                or cached_summary.get("images_total") != expected_images
                or cached.stats["accepted"] != 0
            ):
                problems.append(
                    f"cached: exit {cached.returncode}, images "
                    f"{cached_summary.get('images_total')}/{expected_images}, "
                    f"{cached.stats['accepted']} submits ({cached.log})"
                )
            image_keys_after = [
                k
                for k in s3.keys("bench-plugin", f"plugin{tag}/")
                if k.endswith("." + args.output_format.replace("jpeg", "jpg"))
            ]
            if len(image_keys_after) != len(image_keys):
                problems.append(
                    f"cached: image objects went from {len(image_keys)} to {len(image_keys_after)}"
                )
            runs.append((lookahead, plugin, cached, warmup_s))
    finally:
        if api is not None:
            api.stop()
        s3.stop()
        emulator.stop()

    for lookahead, plugin, cached, warmup_s in runs:
        # raw never imports the package; the plugin phases must have run on one version of it
        digests = {*plugin.digests, *cached.digests}
        changed = len(digests) > 1
        if changed:
            print(
                f"[bench {now()}] WARNING: prefect_gptimage's sources changed during the plugin "
                f"phases ({plugin.digests} -> {cached.digests}): they measured different code",
                file=sys.stderr,
            )
        n = args.n
        report = {
            "n": n,
            "api": "prefect server start (SQLite, running)"
            if api_start_s is not None
            else "temporary (started by the CLI)",
            "prefect_home": "fresh"
            if args.cold_prefect_home
            else (
                "fresh client home, server migrated before" if api_start_s is not None else "warm"
            ),
            "lookahead": lookahead,
            "concurrency": args.concurrency,
            "latency": args.latency,
            "limit": args.limit,
            "ideal_s": math.ceil(n / args.limit) * args.latency,
            "plugin_s": plugin.seconds,
            "raw_s": raw.seconds if raw else None,
            "ratio": ratio(plugin.seconds, raw.seconds) if raw else None,
            "plugin_machine_cpu_s": plugin.machine_cpu_seconds,
            "raw_machine_cpu_s": raw.machine_cpu_seconds if raw else None,
            "machine_cpu_ratio": ratio(plugin.machine_cpu_seconds, raw.machine_cpu_seconds)
            if raw
            else None,
            "plugin_bench_cpu_s": plugin.bench_cpu_seconds,
            "raw_bench_cpu_s": raw.bench_cpu_seconds if raw else None,
            "bench_cpu_ratio": ratio(plugin.bench_cpu_seconds, raw.bench_cpu_seconds)
            if raw
            else None,
            "plugin_cpu_s": plugin.cpu_seconds,
            "raw_cpu_s": raw.cpu_seconds if raw else None,
            "tree_cpu_ratio": ratio(plugin.cpu_seconds, raw.cpu_seconds) if raw else None,
            "plugin_server_cpu_s": plugin.server_cpu_seconds,
            "plugin_status_per_request": round(plugin.stats["status"] / n, 2),
            "raw_status_per_request": round(raw.stats["status"] / n, 2) if raw else None,
            "plugin_peak_rss_mb": plugin.peak_rss_mb,
            "raw_peak_rss_mb": raw.peak_rss_mb if raw else None,
            "cached_rerun_s": cached.seconds,
            "cached_rerun_submits": cached.stats["accepted"],
            "cached_ratio": round(cached.seconds / plugin.seconds, 3),
            "cached_rerun_machine_cpu_s": cached.machine_cpu_seconds,
            "cached_rerun_cpu_s": cached.cpu_seconds,
            "cached_rerun_server_cpu_s": cached.server_cpu_seconds,
            "cached_rerun_peak_rss_mb": cached.peak_rss_mb,
            "plugin_duplicate_submits": plugin.stats["duplicate_submits"],
            "raw_duplicate_submits": raw.stats["duplicate_submits"] if raw else None,
            "plugin_submits": plugin.stats["accepted"],
            "raw_submits": raw.stats["accepted"] if raw else None,
            "plugin_max_in_progress": plugin.stats["max_in_progress"],
            "raw_max_in_progress": raw.stats["max_in_progress"] if raw else None,
            "plugin_calls": plugin.stats,
            "raw_calls": raw.stats if raw else None,
            "plugin_timeline": plugin.timeline,
            "raw_timeline": raw.timeline if raw else None,
            "load": {
                "start": started_load,
                "raw": raw.load if raw else None,
                "plugin": plugin.load,
                "cached": cached.load,
                "cpus": os.cpu_count(),
            },
            "image_size": args.image_size,
            "num_images": args.num_images,
            "servers": "subprocesses",
            "prefect_home_warmup_s": warmup_s,
            "prefect_server_start_s": api_start_s,
            "versions": about,
            "package_digest": plugin.digests[0],
            "package_changed_during_run": changed,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "verified": not problems,
        }
        print(json.dumps(report), flush=True)
    for problem in problems:
        print(f"[bench {now()}] FAILED {problem}", file=sys.stderr)
    if args.keep or problems:
        print(f"[bench {now()}] kept {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
