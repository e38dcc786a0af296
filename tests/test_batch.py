"""batch_to_s3 end to end: emulator (HTTPS, unmodified fal_client), moto S3 server, Prefect."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from prefect_gptimage.errors import BatchIncomplete
from prefect_gptimage.flows.batch import batch_to_s3
from prefect_gptimage.prompts import InvalidPromptFile, load_prompt_file
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.testing import FalEmulator, Fault
from prefect_gptimage.testing.s3 import LocalS3Server


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(**kw: object) -> tuple[RunSummary, str]:
    state = batch_to_s3(return_state=True, **kw)  # type: ignore[arg-type]
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, BatchIncomplete):  # a row failed: the exception carries the summary
        assert state.is_failed() and not summary.summary.ok
        summary = summary.summary
    assert isinstance(summary, RunSummary), summary
    return summary, state.type.value


def objects(local_s3: LocalS3Server, bucket: str) -> dict[str, dict[str, object]]:
    s3 = local_s3.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.head_object(Bucket=bucket, Key=k) for k in keys}


def test_batch_stages_images_and_manifest(
    fal_emulator: FalEmulator, local_s3: LocalS3Server, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    rows = [
        {"prompt": f"a tram {unique}", "quality": "low", "num_images": 2},
        {
            "prompt": f"a canal {unique}",
            "quality": "medium",
            "image_size": "1536x1024",
            "output_format": "jpeg",
        },
        {
            "prompt": f"a bridge {unique}",
            "quality": "low",
            "output_format": "webp",
            "background": "opaque",
        },
        {
            "prompt": f"a tram {unique}",
            "quality": "low",
            "num_images": 2,
        },  # duplicate row: not paid twice
    ]
    fal_emulator.inject(Fault("status", "500_json", count=3))
    fal_emulator.inject(Fault("result", "500_json", count=2))
    fal_emulator.inject(Fault("media", "503_json", count=2))
    before = fal_emulator.stats["accepted"]
    summary, state = run(
        prompt_file=str(write_jsonl(tmp_path / "p.jsonl", rows)),
        bucket=s3_bucket,
        output_dir=str(tmp_path / "out"),
        concurrency=4,
    )
    assert state == "COMPLETED" and summary.failures == []
    assert fal_emulator.stats["accepted"] == before + 3
    objs = objects(local_s3, s3_bucket)
    images = {k: v for k, v in objs.items() if "/manifests/" not in k}
    assert len(images) == 4
    assert {v["ContentType"] for v in images.values()} == {"image/png", "image/jpeg", "image/webp"}
    assert summary.manifest_uri and summary.manifest_uri.startswith(f"s3://{s3_bucket}/")
    manifest_key = summary.manifest_uri.split("/", 3)[3]
    body = local_s3.client().get_object(Bucket=s3_bucket, Key=manifest_key)["Body"].read().decode()
    lines = [json.loads(line) for line in body.splitlines()]
    assert len(lines) == 4 and all(line["kind"] == "image" for line in lines)
    assert all(line["s3_uri"].startswith("s3://") and len(line["sha256"]) == 64 for line in lines)
    assert summary.estimated_cost_usd == pytest.approx(2 * 0.009 + 0.050 + 0.009)
    assert summary.gallery and Path(summary.gallery).exists()

    # the same batch again: nothing submitted, no object written again
    etags = {k: v["ETag"] for k, v in images.items()}
    again, _ = run(
        prompt_file=str(tmp_path / "p.jsonl"),
        bucket=s3_bucket,
        output_dir=str(tmp_path / "out"),
    )
    assert fal_emulator.stats["accepted"] == before + 3
    assert again.submitted == 0 and again.estimated_cost_usd == 0
    assert {k: v["ETag"] for k, v in objects(local_s3, s3_bucket).items() if k in etags} == etags


def test_csv_any_field_as_column(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["prompt", "quality", "num_images", "image_size", "image_urls", "sync_mode", "variant"]
        )
        w.writerow(["a cat", "low", "2", "1536x1024", "", "", ""])
        w.writerow(["night sky", "", "", "auto", "https://a/b.png|https://a/c.png", "true", "1"])
    rows = load_prompt_file(path)
    assert rows[0].request.num_images == 2 and rows[0].request.quality == "low"
    assert rows[1].request.endpoint.endswith("/edit") and rows[1].variant == 1
    assert rows[1].request.image_urls == ["https://a/b.png", "https://a/c.png"]  # type: ignore[union-attr]


def test_every_bad_row_is_reported_before_anything_is_paid(
    fal_emulator: FalEmulator, tmp_path: Path
) -> None:
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "fine prompt"},
            {"prompt": "x"},
            {"prompt": "ok", "num_images": 9},
        ],
    )
    before = fal_emulator.stats["submit"]
    with pytest.raises(InvalidPromptFile) as info:
        load_prompt_file(path)
    assert "line 2: prompt" in str(info.value) and "line 3: num_images" in str(info.value)
    with pytest.raises(InvalidPromptFile):
        batch_to_s3(prompt_file=str(path))
    assert fal_emulator.stats["submit"] == before


def test_failures_are_reported_in_the_manifest(
    fal_emulator: FalEmulator, local_s3: LocalS3Server, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    fal_emulator.inject(Fault("submit", "fail", status_code=422, match=f"bad {unique}"))
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": f"good {unique}", "quality": "low"},
            {"prompt": f"bad {unique}", "quality": "low"},
        ],
    )
    summary, state = run(prompt_file=str(path), bucket=s3_bucket, output_dir=str(tmp_path / "o"))
    assert state == "FAILED"
    assert len(summary.images) == 1 and len(summary.failures) == 1
    assert summary.failures[0].error_type == "content_policy_violation"
    manifest = Path(tmp_path / "o").glob("*/manifest.jsonl")
    kinds = [json.loads(line)["kind"] for line in next(manifest).read_text().splitlines()]
    assert sorted(kinds) == ["failure", "image"]


def test_a_failed_row_names_its_line_prompt_and_kind(
    fal_emulator: FalEmulator, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": f"fine {unique}", "quality": "low"},
            {"prompt": f"refused {unique}", "quality": "low"},
        ],
    )
    fal_emulator.inject(Fault("submit", "fail", status_code=422, match=f"refused {unique}"))
    summary, state = run(prompt_file=str(path), bucket=s3_bucket, output_dir=str(tmp_path / "o"))
    assert state == "FAILED"
    (failure,) = summary.failures
    assert failure.line == 2 and failure.label() == f'line 2 "refused {unique}"'
    assert failure.error_type == "content_policy_violation"


def test_dry_run_and_spend_guard_submit_nothing(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": f"high quality {unique}", "num_images": 4},  # 4 x $0.133
            {"prompt": f"low {unique}", "quality": "low"},
        ],
    )
    before = fal_emulator.stats["submit"]
    summary, state = run(prompt_file=str(path), dry_run=True)
    assert state == "COMPLETED" and summary.estimated_cost_usd == pytest.approx(4 * 0.133 + 0.009)
    summary, state = run(prompt_file=str(path), max_cost=0.5)
    assert state == "FAILED"
    assert fal_emulator.stats["submit"] == before
    summary, state = run(prompt_file=str(path), max_cost=0.6, output_dir=str(tmp_path / "o"))
    assert state == "COMPLETED" and fal_emulator.stats["submit"] == before + 2
    # cached rows are free: the same file now fits any budget
    summary, state = run(prompt_file=str(path), max_cost=0.0, output_dir=str(tmp_path / "o"))
    assert state == "COMPLETED" and summary.submitted == 0


def test_each_row_is_one_task_run_named_after_it(
    fal_emulator: FalEmulator, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    """12 rows: 12 row task runs (plus at most 2 others), each named ``row N: <prompt>``, so
    the rows can be told apart in the UI; submit, wait, fetch and upload open none of their own."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    rows = [{"prompt": f"kite {i} over a beach {unique}", "quality": "low"} for i in range(12)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    state = batch_to_s3(
        prompt_file=str(path),
        bucket=s3_bucket,
        output_dir=str(tmp_path / "o"),
        concurrency=4,
        return_state=True,
    )
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    row_runs = [r for r in runs if r.name.startswith("row ")]
    print(f"\n12-row batch: {len(runs)} task runs ({len(row_runs)} rows)")
    assert len(row_runs) == 12 and len(runs) <= 12 + 2, sorted(r.name for r in runs)
    names = {r.name for r in row_runs}
    assert len(names) == 12  # distinct: each names its line and its prompt
    assert f"row 1: kite 0 over a beach {unique}"[:46] in {n[:46] for n in names}
    assert all(r.state is not None and r.state.is_completed() for r in row_runs)


def test_a_stop_starts_no_new_row_and_leaves_rows_in_flight_to_a_re_run(
    fal_emulator: FalEmulator, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    """The Stop passed in: rows not started are "not started", rows at fal "in flight" after
    the grace (the flow returns without waiting for fal); a re-run resumes them unpaid."""
    import threading
    import time

    from prefect_gptimage.engine.settle import IN_FLIGHT, NOT_STARTED
    from prefect_gptimage.engine.stop import Stop

    rows = [{"prompt": f"slow kite {i} {unique}", "quality": "low"} for i in range(6)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    kw: dict[str, object] = {
        "prompt_file": str(path),
        "bucket": s3_bucket,
        "output_dir": str(tmp_path / "o"),
        "concurrency": 1,
        "lookahead": 0,
    }
    before = fal_emulator.stats
    stop = Stop(grace=0.5)

    def stop_after_first_accept() -> None:
        deadline = time.monotonic() + 120
        while fal_emulator.stats["accepted"] == before["accepted"] and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.request("test")

    fal_emulator.set_latency(15.0)
    stopper = threading.Thread(target=stop_after_first_accept, daemon=True)
    stopper.start()
    try:
        summary, state = run(**kw, stop=stop)
    finally:
        fal_emulator.set_latency(0.0)
    stopper.join()
    ours = [r for r in fal_emulator.requests() if unique in str(r.arguments["prompt"])]
    assert ours and all(r.completed_at is None for r in ours)  # returned before fal finished
    assert state == "FAILED" and stop.summary is summary
    kinds = [f.error_type for f in summary.failures]
    assert len(kinds) == 6 and set(kinds) <= {IN_FLIGHT, NOT_STARTED}, kinds
    assert kinds.count(IN_FLIGHT) == len(ours) >= 1  # each row at fal, reported in flight
    # the rows left at fal were paid by this run: counted, each with its request id
    assert summary.submitted == len(ours) and summary.images == []
    in_flight = [f for f in summary.failures if f.error_type == IN_FLIGHT]
    assert {f.request_id for f in in_flight} == {r.request_id for r in ours}

    again, state = run(**kw)  # resumes what is at fal, pays for the rest once
    assert state == "COMPLETED" and len(again.images) == 6
    after = fal_emulator.stats
    assert after["accepted"] - before["accepted"] == 6  # nothing paid twice
    assert after["duplicate_submits"] == before["duplicate_submits"]
