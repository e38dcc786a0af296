"""The bill reconciled with fal's billing events (issue 21): run, manifest, artifact, command.

On the bundled emulator's platform API, which bills what it actually ran and needs the admin
key: a batch with ``FAL_ADMIN_KEY`` records per row what fal billed beside the estimate, in the
manifest, the results artifact and the summary, also when billing events come late and the
endpoint answers 500 first; without an admin key the costs stay estimates; and
``prefect-gptimage reconcile`` reconciles an older manifest (local or on S3), writing it beside
the original and reporting a row whose bill differs from its estimate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli_process
from test_manifest_artifacts import flow_artifacts

from prefect_gptimage.errors import BatchIncomplete
from prefect_gptimage.flows.batch import batch_to_s3
from prefect_gptimage.reporting.billing import reconcile_lines
from prefect_gptimage.reporting.manifest import ImageLine
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.platform_api import ADMIN_KEY
from prefect_gptimage.testing.s3 import LocalS3Server


@pytest.fixture(autouse=True)
def _platform(fal_emulator: FalEmulator) -> Iterator[None]:
    fal_emulator.platform.reset()
    yield
    fal_emulator.platform.reset()


def write_rows(path: Path, unique: str) -> Path:
    rows = [
        {"prompt": f"a billed kite {unique}", "quality": "low"},
        {"prompt": f"a billed canal {unique}", "quality": "medium", "image_size": "1536x1024"},
        {"prompt": f"two billed trams {unique}", "quality": "low", "num_images": 2},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(**kw: object) -> tuple[RunSummary, Any]:
    state = batch_to_s3(return_state=True, **kw)  # type: ignore[arg-type]
    result = state.result(raise_on_failure=False)
    summary = result.summary if isinstance(result, BatchIncomplete) else result
    assert isinstance(summary, RunSummary), summary
    assert state.is_completed(), summary.failures
    return summary, state


def s3_lines(local_s3: LocalS3Server, uri: str) -> list[dict[str, Any]]:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    body = local_s3.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def billed_by_request(lines: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in lines:
        if line["kind"] == "image":
            out[line["request_id"]] = out.get(line["request_id"], 0.0) + line["billed_cost_usd"]
    return out


def test_a_batch_with_an_admin_key_records_what_fal_billed_late_events_and_500s_included(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    unique: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAL_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("PREFECT_GPTIMAGE_BILLING_WAIT", "120")
    fal_emulator.platform.set_billing_delay(4)  # events appear 4 s after each request ended
    fal_emulator.platform.fail_billing(2)  # and the first two asks answer 500
    summary, state = run(
        prompt_file=str(write_rows(tmp_path / "p.jsonl", unique)),
        bucket=s3_bucket,
        output_dir=str(tmp_path / "out"),
    )
    platform = fal_emulator.platform.to_dict()
    assert platform["failed_calls"] == 2  # retried under the retry policy
    assert platform["calls"]["billing_events"] >= 3
    assert summary.manifest_uri is not None
    lines = s3_lines(local_s3, summary.manifest_uri)
    bill = fal_emulator.bill()
    by_request = billed_by_request(lines)
    assert len(by_request) == 3
    for request_id, billed in by_request.items():
        assert billed == pytest.approx(bill[request_id], abs=1e-6)
    assert bill[next(iter(by_request))] > 0
    assert summary.costs == "billed" and summary.not_billed_yet == []
    assert summary.billed_cost_usd == pytest.approx(sum(by_request.values()), abs=1e-6)
    assert summary.billed_cost_usd == pytest.approx(summary.estimated_cost_usd, abs=1e-6)
    assert summary.cost_differences == []
    for line in lines:  # the estimate stays beside the bill
        assert line["estimated_cost_usd"] == pytest.approx(line["billed_cost_usd"], abs=1e-6)

    artifacts = flow_artifacts(state.state_details.flow_run_id)
    table = next(a for a in artifacts if a.type == "table")
    rows = table.data if isinstance(table.data, list) else json.loads(str(table.data))
    assert [r["billed_usd"] for r in rows] == [r["cost_usd"] for r in rows]
    assert "fal billed $" in (table.description or "")
    gallery = next(a for a in artifacts if a.type == "markdown" and "gallery" in (a.key or ""))
    assert "fal billed **$" in str(gallery.data) and "(billed $" in str(gallery.data)


@pytest.fixture
def estimated(
    fal_emulator: FalEmulator,
    s3_bucket: str,
    unique: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> RunSummary:
    """A batch to S3 with no admin key: its costs are estimates."""
    monkeypatch.delenv("FAL_ADMIN_KEY", raising=False)
    summary, _ = run(
        prompt_file=str(write_rows(tmp_path / "p.jsonl", unique)),
        bucket=s3_bucket,
        output_dir=str(tmp_path / "o"),
    )
    assert summary.costs == "estimated" and summary.billed_cost_usd is None
    assert summary.manifest_uri is not None
    return summary


def test_without_an_admin_key_costs_stay_estimates_and_billing_needs_the_admin_key(
    fal_emulator: FalEmulator, local_s3: LocalS3Server, estimated: RunSummary
) -> None:
    summary = estimated
    assert summary.manifest_uri is not None
    raw = s3_lines(local_s3, summary.manifest_uri)
    assert len(raw) == 4 and all("billed_cost_usd" not in line for line in raw)
    assert fal_emulator.platform.to_dict()["calls"]["billing_events"] == 0

    lines = [ImageLine.model_validate(line) for line in raw]
    with pytest.raises(Exception, match="403"):
        reconcile_lines(lines, "not-an-admin-key", wait=0)
    # a request that failed at fal: no event, billed 0
    failed = ImageLine.model_validate(
        {**lines[0].model_dump(), "request_id": "never-ran", "estimated_cost_usd": 0.009}
    )
    rec = reconcile_lines([failed], ADMIN_KEY, wait=0)
    assert rec.waiting == ["never-ran"] and rec.billed == {}


def test_reconcile_command_writes_the_reconciled_manifest_beside_the_old_one(
    fal_emulator: FalEmulator, local_s3: LocalS3Server, estimated: RunSummary, tmp_path: Path
) -> None:
    summary = estimated
    assert summary.manifest_uri is not None
    env = {**os.environ, "FAL_ADMIN_KEY": ADMIN_KEY, "PREFECT_GPTIMAGE_BILLING_WAIT": "30"}
    done = run_cli_process(["reconcile", summary.manifest_uri, "--json"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    out_uri = summary.manifest_uri.removesuffix(".jsonl") + ".reconciled.jsonl"
    assert report["manifest_uri"] == out_uri and report["differences"] == []
    bill = fal_emulator.bill()
    by_request = billed_by_request(s3_lines(local_s3, out_uri))
    assert {r: pytest.approx(bill[r], abs=1e-6) for r in by_request} == by_request
    assert "billed_cost_usd" not in json.dumps(s3_lines(local_s3, summary.manifest_uri))

    # a local manifest whose estimate was off: the row is reported
    local = tmp_path / "old" / "manifest.jsonl"
    local.parent.mkdir()
    lines = s3_lines(local_s3, summary.manifest_uri)
    lines[0]["estimated_cost_usd"] = 0.5
    local.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = run_cli_process(["reconcile", str(local)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "differs:" in done.stdout and lines[0]["request_id"] in done.stdout
    assert (tmp_path / "old" / "manifest.reconciled.jsonl").exists()

    no_key = {k: v for k, v in env.items() if k != "FAL_ADMIN_KEY"}
    refused = run_cli_process(["reconcile", str(local)], no_key)
    assert refused.returncode == 2 and "FAL_ADMIN_KEY" in refused.stderr
