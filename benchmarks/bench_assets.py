"""What Prefect assets (and events) cost a batch: the same batch with them on and off, offline.

``prefect-gptimage batch FILE --bucket B --json`` of ``--n`` rows (one image each) runs as a
subprocess, as a user runs it, in three modes, alternated so that drift in the machine's load
hits all of them alike:

* ``none``: ``PREFECT_GPTIMAGE_EVENTS=false PREFECT_GPTIMAGE_ASSETS=false``;
* ``events``: events on, assets off (``PREFECT_GPTIMAGE_ASSETS=false``);
* ``assets``: both on (the default): one ``image.staged`` event and one asset materialization
  per image, in materializing task runs of up to 50 images.

Every run has its own prompt file (unique prompts: nothing is served from the cache) and result
storage, on one Prefect home: warmed up untimed beforehand (a user's home has its database), or
with ``--fresh-home`` a brand-new home per run (database creation and migrations timed in). By
default the API is the temporary one the CLI starts; ``--server`` starts a real
``prefect server start`` (SQLite) and points every run at it with ``PREFECT_API_URL``.

Whole runs on a shared or busy machine vary by more than assets cost, so ``--synthetic`` also
times the added work alone: a subprocess runs one flow that announces ``--n`` made-up staged
images exactly as ``RunReport`` does (an ``image.staged`` event each, ``ImageAssets`` groups,
the manifest asset, ``batch.completed``), in the same three modes, against the same kind of API.
It reports the seconds the flow's thread spent on them (``loop_s``), the time from the flow's
start to the process's exit (``flow_to_exit_s``: the events' delivery at exit included, the
API's start left out) and the process's wall and CPU time.

The fal emulator and the S3 server (moto) run in their own subprocesses
(``benchmarks/bench_batch.py``'s helpers). Prints ONE JSON line: each run's wall and CPU seconds,
the median per mode, the ratios ``assets / none`` and ``assets / events`` (wall, and CPU of the
whole process tree, which a loaded machine disturbs less), the added seconds, and the versions.
Exit status 0 only if every run staged every image.

Usage::

    .venv/bin/python benchmarks/bench_assets.py --n 1000 --repeats 2 --latency 0.05
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))  # real_services: the suite's service launchers

from bench_batch import (  # noqa: E402
    FAL_KEY,
    Emulator,
    S3Server,
    last_json,
    now,
    package_digest,
    plugin_command,
    run_measured,
    warm_prefect_home,
)

MODES: dict[str, dict[str, str]] = {
    "none": {"PREFECT_GPTIMAGE_EVENTS": "false", "PREFECT_GPTIMAGE_ASSETS": "false"},
    "events": {"PREFECT_GPTIMAGE_ASSETS": "false"},
    "assets": {},
}


def write_prompts(path: Path, n: int) -> None:
    tag = uuid.uuid4().hex[:8]
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            row = {"prompt": f"asset bench {tag} row {i:06d}: a paper lantern", "quality": "low"}
            fh.write(json.dumps(row) + "\n")


def synthetic_child(mode: str, n: int) -> int:
    """``--synthetic-child MODE N``: one flow announcing N made-up staged images; prints JSON."""
    import datetime as dt

    from prefect import flow

    from prefect_gptimage.reporting import events
    from prefect_gptimage.reporting.assets import ImageAssets, assets_enabled
    from prefect_gptimage.reporting.manifest import cost_per_image
    from prefect_gptimage.s3 import StagedImage
    from prefect_gptimage.schemas import GptImageRequest

    @flow(name="bench-assets-synthetic")
    def announce() -> dict[str, Any]:
        flow_started_at = time.time()
        tag = uuid.uuid4().hex[:8]
        manifest_uri = f"s3://bench-assets/synthetic/manifests/{tag}.jsonl"
        on = events.events_enabled()
        assets = ImageAssets("bench-assets", tag, manifest_uri) if assets_enabled() else None
        request = GptImageRequest(prompt=f"synthetic {tag}", quality="low")
        cost = cost_per_image(request)
        started = time.perf_counter()
        for i in range(n):
            key = f"synthetic/fal-ai-gpt-image-1-5/{tag}-{i:06d}/00-synthetic.png"
            staged = StagedImage(
                bucket="bench-assets",
                key=key,
                s3_uri=f"s3://bench-assets/{key}",
                url=f"http://127.0.0.1:9/bench-assets/{key}?X-Amz-Signature=0",
                url_expires_at=dt.datetime.now(dt.timezone.utc),
                content_type="image/png",
                format="png",
                bytes=1234567,
                sha256="ab" * 32,
                width=1024,
                height=1024,
                request_id=f"{tag}-{i:06d}",
                endpoint=request.endpoint,
                index=0,
                uploaded=True,
            )
            if on:
                events.image_staged(
                    staged, cost=cost, cached=False, manifest_uri=manifest_uri, run_key=tag
                )
            if assets is not None:
                assets.add(staged, request, request.prompt, cached=False)
        if assets is not None:
            assets.manifest(manifest_uri, {"images": n})
        if on:
            events.batch_completed(manifest_uri, {"images": n})
        return {
            "mode": mode,
            "loop_s": round(time.perf_counter() - started, 3),
            "materialized": assets.materialized if assets is not None else 0,
            "flow_started_at": flow_started_at,
        }

    print(json.dumps(announce()), flush=True)
    return 0


def run_synthetic(
    args: argparse.Namespace, base: dict[str, str], work: Path, logs: Path, problems: list[str]
) -> list[dict[str, Any]]:
    results = []
    order = [m for r in range(args.repeats) for m in (args.modes[:: (-1) ** r])]
    for i, mode in enumerate(order):
        env = dict(base, **MODES[mode])
        if args.fresh_home:
            env["PREFECT_HOME"] = str(work / f"prefect-home-synthetic-{i}")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--synthetic-child", mode]
        cmd += ["--n", str(args.n)]
        result = run_measured(f"synthetic-{i}-{mode}", cmd, env, logs, args.timeout)
        ended_at = time.time()
        child = last_json(result.stdout) or {}
        # from the flow's start to the process's exit: without the API's start, which a busy
        # machine stretches by more than the work measured here
        started_at = child.pop("flow_started_at", None)
        child["flow_to_exit_s"] = round(ended_at - started_at, 3) if started_at else None
        print(
            f"[bench {now()}] synthetic {i}: {mode} rc={result.returncode} {result.seconds}s "
            f"cpu={result.cpu_seconds}s {child}",
            file=sys.stderr,
            flush=True,
        )
        expected = args.n if mode == "assets" else 0  # images (the manifest is not counted)
        if result.returncode != 0 or child.get("materialized") != expected:
            problems.append(f"synthetic {i} ({mode}): exit {result.returncode} ({result.log})")
            continue  # (a loaded machine can time out the temporary API's start)
        results.append(
            {
                "mode": mode,
                "seconds": result.seconds,
                "cpu_seconds": result.cpu_seconds,
                "loop_s": child.get("loop_s"),
                "flow_to_exit_s": child.get("flow_to_exit_s"),
            }
        )
    return results


def medians(runs: list[dict[str, Any]], field: str) -> dict[str, float]:
    modes = dict.fromkeys(r["mode"] for r in runs)
    return {m: statistics.median(r[field] for r in runs if r["mode"] == m) for m in modes}


def versions() -> dict[str, str]:
    import boto3
    import prefect

    return {
        "python": platform.python_version(),
        "prefect": prefect.__version__,
        "boto3": boto3.__version__,
        "prefect_gptimage_sources": package_digest(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="rows, one image each")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.05, help="emulated generation s")
    parser.add_argument("--limit", type=int, default=16, help="emulated fal account limit")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--fresh-home", action="store_true", help="a new PREFECT_HOME per run")
    parser.add_argument("--server", action="store_true", help="a real `prefect server start`")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument(
        "--synthetic", action="store_true", help="also time the added work alone (see above)"
    )
    parser.add_argument("--skip-runs", action="store_true", help="only the synthetic phase")
    parser.add_argument("--synthetic-child", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.synthetic_child:
        return synthetic_child(args.synthetic_child, args.n)

    work = Path(tempfile.mkdtemp(prefix="bench-assets-"))
    logs = work / "logs"
    logs.mkdir()
    print(f"[bench {now()}] work dir {work}", file=sys.stderr, flush=True)
    emulator = Emulator(args.latency, args.limit, logs)
    s3 = S3Server(logs)
    api = None
    problems: list[str] = []
    runs: list[dict[str, Any]] = []
    synthetic: list[dict[str, Any]] = []
    try:
        s3.client().create_bucket(Bucket="bench-assets")
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "FAL_", "AWS_")) and k != "SSL_CERT_FILE"
        }
        base.update(emulator.env, **s3.env)
        base.update(
            FAL_KEY=FAL_KEY,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_GPTIMAGE_LOCAL_CONCURRENCY=str(args.limit),
            PREFECT_HOME=str(work / "prefect-home"),
            # a busy machine can take longer than Prefect's default 20 s to start the API
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        )
        if args.server:
            from real_services import PrefectServer

            api = PrefectServer().start()
            base["PREFECT_API_URL"] = api.api_url
        warmup = None if args.fresh_home else warm_prefect_home(base)
        if args.synthetic:
            synthetic = run_synthetic(args, base, work, logs, problems)
        order = [m for r in range(args.repeats) for m in (args.modes[:: (-1) ** r])]
        for i, mode in enumerate([] if args.skip_runs else order):
            env = dict(base, **MODES[mode])
            env["PREFECT_LOCAL_STORAGE_PATH"] = str(work / f"results-{i}")
            if args.fresh_home:
                env["PREFECT_HOME"] = str(work / f"prefect-home-{i}")
            prompts = work / f"prompts-{i}.jsonl"
            write_prompts(prompts, args.n)
            cmd = [*plugin_command(), "batch", str(prompts), "--bucket", "bench-assets"]
            cmd += ["--prefix", f"run{i}", "--concurrency", str(args.concurrency), "--json"]
            cmd += ["--output-dir", str(work / f"out-{i}")]
            print(f"[bench {now()}] run {i}: {mode}", file=sys.stderr, flush=True)
            result = run_measured(f"{i}-{mode}", cmd, env, logs, args.timeout)
            summary = last_json(result.stdout) or {}
            print(
                f"[bench {now()}] run {i}: {mode} rc={result.returncode} {result.seconds}s "
                f"cpu={result.cpu_seconds}s staged={summary.get('staged')}",
                file=sys.stderr,
                flush=True,
            )
            if result.returncode != 0 or summary.get("staged") != args.n:
                problems.append(f"run {i} ({mode}): exit {result.returncode} ({result.log})")
            runs.append(
                {
                    "mode": mode,
                    "seconds": result.seconds,
                    "cpu_seconds": result.cpu_seconds,
                    "peak_rss_mb": result.peak_rss_mb,
                }
            )
    finally:
        if api is not None:
            api.stop()
        s3.stop()
        emulator.stop()

    median, cpu = medians(runs, "seconds"), medians(runs, "cpu_seconds")
    out: dict[str, Any] = {
        "n_images": args.n,
        "repeats": args.repeats,
        "concurrency": args.concurrency,
        "latency_s": args.latency,
        "limit": args.limit,
        "api": "prefect server start (SQLite)" if args.server else "temporary (CLI-started)",
        "prefect_home": "fresh per run" if args.fresh_home else "warm (one flow run beforehand)",
        "warmup_s": warmup,
        "median_seconds": median,
        "median_cpu_seconds": cpu,
        "runs": runs,
        "versions": versions(),
        "work_dir": str(work),
        "problems": problems,
    }
    if "assets" in median and "none" in median:
        out["ratio_assets_vs_none"] = round(median["assets"] / median["none"], 3)
        out["added_seconds_vs_none"] = round(median["assets"] - median["none"], 2)
        out["added_ms_per_image_vs_none"] = round(
            1000 * (median["assets"] - median["none"]) / args.n, 2
        )
        out["cpu_ratio_assets_vs_none"] = round(cpu["assets"] / cpu["none"], 3)
        out["added_cpu_seconds_vs_none"] = round(cpu["assets"] - cpu["none"], 2)
    if "assets" in median and "events" in median:
        out["ratio_assets_vs_events"] = round(median["assets"] / median["events"], 3)
        out["added_seconds_vs_events"] = round(median["assets"] - median["events"], 2)
    if synthetic:
        wall, cpu_s, loop, tail = (
            medians(synthetic, f) for f in ("seconds", "cpu_seconds", "loop_s", "flow_to_exit_s")
        )
        summary: dict[str, Any] = {"median_seconds": wall, "median_cpu_seconds": cpu_s}
        summary["median_loop_s"], summary["median_flow_to_exit_s"] = loop, tail
        if "assets" in wall and "none" in wall:
            summary["ratio_assets_vs_none"] = round(wall["assets"] / wall["none"], 3)
            summary["added_seconds_vs_none"] = round(wall["assets"] - wall["none"], 2)
            summary["added_cpu_seconds_vs_none"] = round(cpu_s["assets"] - cpu_s["none"], 2)
            summary["added_loop_ms_per_image"] = round(
                1000 * (loop["assets"] - loop["none"]) / args.n, 2
            )
            summary["added_flow_to_exit_s"] = round(tail["assets"] - tail["none"], 2)
            summary["ratio_flow_to_exit_assets_vs_none"] = round(tail["assets"] / tail["none"], 2)
        if "events" in wall and "none" in wall:
            summary["added_seconds_events_vs_none"] = round(wall["events"] - wall["none"], 2)
        out["synthetic"] = {"runs": synthetic, **summary}
    print(json.dumps(out))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
