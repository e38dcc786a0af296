"""The composed pipelines: generate then edit through S3, and scheduled content per date."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefect_gptimage.errors import InvalidRequestError
from prefect_gptimage.flows import generate_then_edit, generate_to_s3, scheduled_content
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.schemas import GptImageRequest
from prefect_gptimage.tasks.cache import request_fingerprint
from prefect_gptimage.testing import FalEmulator, Fault
from prefect_gptimage.testing.s3 import LocalS3Server


def summary_of(state: object) -> RunSummary:
    result = state.result(raise_on_failure=False)  # type: ignore[attr-defined]
    assert isinstance(result, RunSummary), result
    return result


def test_edit_goes_through_a_presigned_url_and_is_cached(
    fal_emulator: FalEmulator, local_s3: LocalS3Server, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    before = fal_emulator.stats["accepted"]
    state = generate_then_edit(
        f"a quiet harbour {unique}",
        f"the same harbour at night {unique}",
        bucket=s3_bucket,
        output_dir=str(tmp_path),
        return_state=True,
    )
    summary = summary_of(state)
    assert state.is_completed() and summary.staged == 2
    edits = [
        r
        for r in fal_emulator.requests()
        if r.endpoint.endswith("/edit") and unique in str(r.arguments["prompt"])
    ]
    assert len(edits) == 1
    url = edits[0].arguments["image_urls"][0]
    assert url.startswith(local_s3.endpoint_url) and "X-Amz-Signature=" in url  # fetched from S3
    assert fal_emulator.stats["accepted"] == before + 2
    # a re-run signs a new URL, but it is the same object: nothing is paid again
    again = summary_of(
        generate_then_edit(
            f"a quiet harbour {unique}",
            f"the same harbour at night {unique}",
            bucket=s3_bucket,
            output_dir=str(tmp_path),
            return_state=True,
        )
    )
    assert again.submitted == 0 and fal_emulator.stats["accepted"] == before + 2


def test_presigned_inputs_are_keyed_by_object() -> None:
    from prefect_gptimage.schemas import GptImageEditRequest

    def edit(url: str) -> GptImageEditRequest:
        return GptImageEditRequest(prompt="night", image_urls=[url])

    a = edit("http://s3/b/k.png?X-Amz-Date=1&X-Amz-Signature=aa")
    b = edit("http://s3/b/k.png?X-Amz-Date=2&X-Amz-Signature=bb")
    c = edit("http://s3/b/other.png?X-Amz-Signature=aa")
    d = edit("https://example.com/k.png?v=1")
    e = edit("https://example.com/k.png?v=2")
    assert request_fingerprint(a) == request_fingerprint(b) != request_fingerprint(c)
    assert request_fingerprint(d) != request_fingerprint(e)  # an ordinary query is content


def test_scheduled_content_is_idempotent_per_date(
    fal_emulator: FalEmulator, local_s3: LocalS3Server, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    template = f"A poster for {{weekday}}, {{date}} {unique}"
    before = fal_emulator.stats["accepted"]
    first = summary_of(
        scheduled_content(
            template,
            bucket=s3_bucket,
            date="2026-11-24",
            output_dir=str(tmp_path),
            return_state=True,
        )
    )
    assert first.staged == 1 and first.submitted == 1
    prompts = [
        str(r.arguments["prompt"])
        for r in fal_emulator.requests()
        if unique in str(r.arguments["prompt"])
    ]
    assert prompts == [f"A poster for Tuesday, 2026-11-24 {unique}"]
    rerun = summary_of(
        scheduled_content(
            template,
            bucket=s3_bucket,
            date="2026-11-24",
            output_dir=str(tmp_path),
            return_state=True,
        )
    )
    assert rerun.submitted == 0 and fal_emulator.stats["accepted"] == before + 1
    next_day = summary_of(
        scheduled_content(
            template,
            bucket=s3_bucket,
            date="2026-11-25",
            output_dir=str(tmp_path),
            return_state=True,
        )
    )
    assert next_day.submitted == 1
    assert "scheduled-2026-11-25" in str(next_day.manifest_uri)


def test_bad_template_fails_before_paying(fal_emulator: FalEmulator) -> None:
    before = fal_emulator.stats["submit"]
    with pytest.raises(InvalidRequestError, match="template"):
        scheduled_content("A poster for {tomorrow}", date="2026-11-24")
    assert fal_emulator.stats["submit"] == before


def test_generate_to_s3_stages_with_content_type(
    fal_emulator: FalEmulator, local_s3: LocalS3Server, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    request = GptImageRequest(
        prompt=f"a lantern {unique}", quality="low", output_format="webp", num_images=2
    )
    summary = summary_of(
        generate_to_s3(request, bucket=s3_bucket, output_dir=str(tmp_path), return_state=True)
    )
    assert summary.staged == 2
    for image in summary.images:
        key = str(image["s3_uri"]).removeprefix(f"s3://{s3_bucket}/")
        head = local_s3.client().head_object(Bucket=s3_bucket, Key=key)
        assert head["ContentType"] == "image/webp"
        assert head["Metadata"]["sha256"] == image["sha256"]


def test_unknown_submit_outcome_is_listed_and_not_paid_again(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    """A dropped submit answer: the row is reported 'outcome unknown, possibly billed' in the
    summary and the manifest, and a plain re-run reports it again without submitting."""
    request = GptImageRequest(prompt=f"a signal box {unique}", quality="low")
    fal_emulator.inject(Fault("submit", "drop_after_accept", count=1, match=unique))
    for run in range(2):
        submits, accepted = fal_emulator.stats["submit"], fal_emulator.stats["accepted"]
        summary = summary_of(generate_to_s3(request, output_dir=str(tmp_path), return_state=True))
        assert not summary.ok and summary.submitted == 0 and summary.images_total == 0
        (failure,) = summary.failures
        assert failure.error_type == "submit_outcome_unknown"
        assert failure.reason.startswith("outcome unknown, possibly billed")
        manifest = Path(str(summary.manifest_uri)).read_text().splitlines()
        assert [json.loads(line)["error_type"] for line in manifest] == ["submit_outcome_unknown"]
        # the first run sent it once (fal accepted it); the re-run sends nothing
        assert fal_emulator.stats["submit"] == submits + (run == 0)
        assert fal_emulator.stats["accepted"] == accepted + (run == 0)
