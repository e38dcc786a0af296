"""Counting what fal accepted (issue 18, "counting"): fal's own errors after it accepted a request
keep the request's id and count it in ``submitted`` and the cost, and a request id answered for
another request (in the same run, or recorded by an earlier run in the same record store) is a
protocol error, never read as this row's result.

Each test runs ``batch_to_s3`` in-process against the emulator (faults injected there), the
moto S3 server and the session's Prefect API; ``submitted`` is compared with the emulator's own
count of accepted submits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from prefect_gptimage.errors import BatchIncomplete
from prefect_gptimage.flows.batch import batch_to_s3
from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.schemas import GptImageRequest
from prefect_gptimage.testing import FalEmulator, Fault
from prefect_gptimage.testing.s3 import LocalS3Server


def _batch(
    rows: list[dict[str, Any]], tmp_path: Path, bucket: str, name: str, **kw: Any
) -> RunSummary:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    state = batch_to_s3(
        prompt_file=str(path),
        bucket=bucket,
        output_dir=str(tmp_path / "out"),
        concurrency=1,  # rows in file order: the emulator's "other" id is the row before
        return_state=True,
        **kw,
    )
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, BatchIncomplete):
        summary = summary.summary
    assert isinstance(summary, RunSummary), summary
    return summary


def _cost(rows: list[dict[str, Any]]) -> float:
    return sum(estimate_cost(GptImageRequest(**r)) for r in rows)


def test_a_result_one_image_short_is_counted_paid_with_its_id(
    fal_emulator: FalEmulator, local_s3: LocalS3Server, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    rows = [
        {"prompt": f"two kites {unique}", "quality": "low", "num_images": 2},
        {"prompt": f"one kite {unique}", "quality": "low"},
    ]
    fal_emulator.inject(Fault("result", "few_images", match=f"two kites {unique}"))
    accepted = fal_emulator.stats["accepted"]

    summary = _batch(rows, tmp_path, s3_bucket, "few")

    paid = fal_emulator.stats["accepted"] - accepted
    assert paid == 2 and summary.submitted == paid
    assert summary.estimated_cost_usd == pytest.approx(_cost(rows))
    (failure,) = summary.failures
    assert failure.error_type == "image_count_mismatch" and failure.paid is True
    ids = {r.request_id for r in fal_emulator.requests() if "two kites" in r.arguments["prompt"]}
    assert failure.request_id in ids


def test_one_id_answered_for_two_rows_of_a_run_counts_both_paid(
    fal_emulator: FalEmulator, local_s3: LocalS3Server, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    rows = [{"prompt": f"lantern {i} {unique}", "quality": "low"} for i in range(2)]
    fal_emulator.inject(Fault("submit", "id_other", match=f"lantern 1 {unique}"))
    accepted = fal_emulator.stats["accepted"]

    summary = _batch(rows, tmp_path, s3_bucket, "dup")

    paid = fal_emulator.stats["accepted"] - accepted
    assert paid == 2 and summary.submitted == paid
    assert summary.estimated_cost_usd == pytest.approx(_cost(rows))
    duplicate = [f for f in summary.failures if f.error_type == "duplicate_request_id"]
    assert duplicate and all(f.request_id for f in duplicate)
    assert summary.staged <= 1  # never one image under two prompts


def test_another_runs_request_id_is_a_protocol_error_not_its_result(
    fal_emulator: FalEmulator, local_s3: LocalS3Server, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    first = [{"prompt": f"a red door {unique}", "quality": "low"}]
    second = [{"prompt": f"a blue door {unique}", "quality": "low"}]
    done = _batch(first, tmp_path, s3_bucket, "first")
    assert done.staged == 1
    earlier_id = done.images[0]["request_id"]
    fal_emulator.inject(Fault("submit", "id_other", match=f"a blue door {unique}"))
    accepted = fal_emulator.stats["accepted"]

    summary = _batch(second, tmp_path, s3_bucket, "second")

    assert fal_emulator.stats["accepted"] - accepted == 1 == summary.submitted
    assert summary.staged == 0 and summary.images == []  # the red door is not this row's
    (failure,) = summary.failures
    assert failure.error_type == "duplicate_request_id" and failure.paid is True
    assert failure.request_id == earlier_id and "protocol error" in failure.reason
    assert summary.estimated_cost_usd == pytest.approx(_cost(second))

    # a plain re-run pays nothing: the row's outcome is unknown, not submitted again
    again = _batch(second, tmp_path, s3_bucket, "second")
    assert fal_emulator.stats["accepted"] - accepted == 1
    assert again.submitted == 0 and again.staged == 0
    assert again.failures[0].error_type == "submit_outcome_unknown"


def test_a_resubmitted_row_counts_both_requests_fal_accepted(
    fal_emulator: FalEmulator, local_s3: LocalS3Server, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    rows = [{"prompt": f"a lost answer {unique}", "quality": "low"}]
    fal_emulator.inject(Fault("submit", "drop_after_accept", count=1, match=unique))
    accepted = fal_emulator.stats["accepted"]

    lost = _batch(rows, tmp_path, s3_bucket, "lost")  # fal accepted it; its answer was lost
    assert lost.failures[0].error_type == "submit_outcome_unknown"
    assert fal_emulator.stats["accepted"] - accepted == 1

    again = _batch(rows, tmp_path, s3_bucket, "lost", resubmit_unknown=True)

    assert again.staged == 1 and fal_emulator.stats["accepted"] - accepted == 2
    # two accepted, two paid: the earlier submit (possibly billed) and this one
    assert again.submitted == 2
    assert again.estimated_cost_usd == pytest.approx(2 * _cost(rows))
    assert "paid for 2 requests" in again.images[0]["note"]
    (manifest,) = (tmp_path / "out").glob("*/manifest.jsonl")
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert "paid for 2 requests" in lines[-1]["note"]
