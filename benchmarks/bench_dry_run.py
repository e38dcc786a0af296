"""``batch --dry-run`` on a used Prefect home, against ``python -c "import prefect"``.

The dry run reads the cache (the local result store) to count the rows already paid for, so on a
used home it has to import Prefect; it must not do more than that (no API, no temporary server,
no flow run). This times both, alternating, in fresh processes with the same environment: a
temporary ``PREFECT_HOME`` whose result store holds a record of the first sample row (so the
cache is really read), no ``PREFECT_API_URL``, no fal key.

Usage::

    .venv/bin/python benchmarks/bench_dry_run.py [--runs 5]

Prints ONE JSON line: the median seconds of each, their ratio (the target is at most 1.5), and
whether the dry run counted the cached row and started no server. Exit status 0 when it did.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "prefect_gptimage" / "data" / "sample_prompts.jsonl"


def _env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "FAL_KEY")) or k == "PREFECT_GPTIMAGE_RETRY_MAX_DELAY"
    }
    env.update({"PREFECT_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage")})
    return env


def _seed_cache(env: dict[str, str]) -> None:
    """Write a submit record for the sample's first row, as a run would (public API only)."""
    code = (
        "from pathlib import Path\n"
        "import os\n"
        "from prefect.filesystems import LocalFileSystem\n"
        "from prefect.results import ResultStore\n"
        "from prefect_gptimage.prompts import load_prompt_file\n"
        "from prefect_gptimage.schemas import RequestHandle\n"
        "from prefect_gptimage.tasks.cache import submit_cache_key\n"
        f"row = load_prompt_file({str(SAMPLE)!r})[0]\n"
        "fs = LocalFileSystem(basepath=os.environ['PREFECT_LOCAL_STORAGE_PATH'])\n"
        "store = ResultStore(result_storage=fs)\n"
        "handle = RequestHandle(endpoint=row.request.endpoint,\n"
        "    request_id='00000000-0000-4000-8000-00000000d1a7')  # fal's ids are UUIDs\n"
        "store.write(obj=handle, key=submit_cache_key(row.request, row.variant))\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)


def _timed(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - started, done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each (default 5)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-dry-run-") as work:
        home = Path(work) / "home"
        env = _env(home)
        _seed_cache(env)
        importing = [sys.executable, "-c", "import prefect"]
        dry_run = [
            *(sys.executable, "-m", "prefect_gptimage.cli", "batch", str(SAMPLE)),
            "--dry-run",
            "--json",
        ]
        _timed(importing, env)  # warm the file cache for both
        _timed(dry_run, env)
        imports, dries, last = [], [], None
        for _ in range(args.runs):
            seconds, _done = _timed(importing, env)
            imports.append(seconds)
            seconds, last = _timed(dry_run, env)
            dries.append(seconds)
        assert last is not None
        cached = "1 cached" in last.stderr
        no_server = not (home / "prefect.db").exists()  # a temporary server creates it
    result = {
        "import_prefect_s": round(statistics.median(imports), 3),
        "dry_run_s": round(statistics.median(dries), 3),
        "ratio": round(statistics.median(dries) / statistics.median(imports), 3),
        "target_ratio": 1.5,
        "runs": args.runs,
        "cache_read": cached,
        "no_server": no_server,
        "load_average": round(os.getloadavg()[0], 2),
        "exit_status": last.returncode,
    }
    print(json.dumps(result))
    return 0 if cached and no_server and last.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
