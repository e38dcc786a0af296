"""The flows' Prefect-facing surface: run-form choices, S3Bucket blocks, partial-batch summaries.

* fixed-value parameters are ``Literal`` types, so the parameter schema (the deployment run form)
  offers an ``enum``;
* ``bucket`` takes a bucket name or a real prefect-aws ``S3Bucket`` block, whose credentials
  (endpoint included) are the ones that stage the images;
* a partly failed batch raises :class:`BatchIncomplete`, which carries the summary and pickles.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle  # type: ignore[import-untyped,unused-ignore]
import pytest
from prefect.utilities.callables import parameter_schema
from prefect_aws import AwsCredentials, S3Bucket

from prefect_gptimage.errors import BatchIncomplete
from prefect_gptimage.flows import (
    batch_to_s3,
    generate_then_edit,
    generate_to_s3,
    scheduled_content,
)
from prefect_gptimage.reporting.summary import Failure, RunSummary
from prefect_gptimage.s3 import reset_s3_clients
from prefect_gptimage.s3.clients import bucket_target
from prefect_gptimage.schemas import GptImageRequest
from prefect_gptimage.testing import FalEmulator, Fault
from prefect_gptimage.testing.s3 import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, LocalS3Server

# -- run-form choices ------------------------------------------------------------------------


def properties(flow: Any) -> dict[str, Any]:
    props: dict[str, Any] = parameter_schema(flow).model_dump()["properties"]
    return props


@pytest.mark.parametrize(
    ("flow", "name", "choices"),
    [
        (scheduled_content, "quality", ["low", "medium", "high"]),
        (scheduled_content, "image_size", ["1024x1024", "1536x1024", "1024x1536"]),
        (scheduled_content, "output_format", ["jpeg", "png", "webp"]),
        (generate_then_edit, "quality", ["low", "medium", "high"]),
        (generate_then_edit, "input_fidelity", ["low", "high"]),
    ],
)
def test_fixed_value_parameters_offer_choices(flow: Any, name: str, choices: list[str]) -> None:
    assert properties(flow)[name]["enum"] == choices


def test_request_parameter_offers_choices() -> None:
    schema = parameter_schema(generate_to_s3).model_dump()
    request_fields = schema["definitions"]["GptImageRequest"]["properties"]
    for name in ("quality", "image_size", "output_format", "background"):
        assert "enum" in json.dumps(request_fields[name]), name


@pytest.mark.parametrize(
    "flow", [batch_to_s3, generate_to_s3, scheduled_content, generate_then_edit]
)
def test_bucket_is_a_name_or_an_s3_bucket_block(flow: Any) -> None:
    schema = parameter_schema(flow).model_dump()
    refs = json.dumps(schema["properties"]["bucket"])
    assert '"type": "string"' in refs and "#/definitions/S3Bucket" in refs
    assert schema["definitions"]["S3Bucket"]["block_type_slug"] == "s3-bucket"


# -- S3Bucket blocks ---------------------------------------------------------------------------


def bucket_block(local_s3: LocalS3Server, name: str, folder: str = "") -> S3Bucket:
    credentials = AwsCredentials(
        aws_access_key_id=TEST_ACCESS_KEY_ID,
        aws_secret_access_key=TEST_SECRET_ACCESS_KEY,
        region_name=local_s3.region,
        aws_client_parameters={"endpoint_url": local_s3.endpoint_url},
    )
    return S3Bucket(bucket_name=name, bucket_folder=folder, credentials=credentials)


@pytest.fixture
def env_s3_unreachable(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """boto3's standard chain points at a closed port: only the block's endpoint reaches S3."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-these")
    reset_s3_clients()
    yield
    reset_s3_clients()


def test_bucket_target_from_a_name_or_a_block(local_s3: LocalS3Server) -> None:
    assert bucket_target(None, "p") == (None, None)
    target, client = bucket_target("plain-bucket", None, default_prefix="scheduled")
    assert target is not None and (target.bucket, target.prefix, client) == (
        "plain-bucket",
        "scheduled",
        None,
    )
    block = bucket_block(local_s3, "from-block", folder="team/images")
    target, client = bucket_target(block, None, presign_expires=60)
    assert target is not None and (target.bucket, target.prefix) == ("from-block", "team/images")
    assert target.presign_expires == 60
    assert client is not None and client.meta.endpoint_url == local_s3.endpoint_url
    target, _ = bucket_target(block, "explicit")
    assert target is not None and target.prefix == "explicit"  # an explicit prefix wins
    target, _ = bucket_target(bucket_block(local_s3, "no-folder"), None)
    assert target is not None and target.prefix == "gptimage"


def test_generate_to_s3_with_a_real_s3_bucket_block(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    env_s3_unreachable: None,
    unique: str,
    tmp_path: Path,
) -> None:
    block = bucket_block(local_s3, s3_bucket, folder="from-block")
    request = GptImageRequest(prompt=f"a signal box {unique}", quality="low", num_images=2)
    state = generate_to_s3(request, bucket=block, output_dir=str(tmp_path), return_state=True)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, RunSummary), summary
    assert state.is_completed() and summary.staged == 2
    keys = [
        o["Key"] for o in local_s3.client().list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    ]
    images = [k for k in keys if "/manifests/" not in k]
    assert len(images) == 2 and all(k.startswith("from-block/") for k in images)
    assert summary.manifest_uri is not None
    assert summary.manifest_uri.removeprefix(f"s3://{s3_bucket}/") in keys
    assert all(str(i["url"]).startswith(local_s3.endpoint_url) for i in summary.images)


def test_batch_to_s3_with_a_saved_s3_bucket_block(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    env_s3_unreachable: None,
    unique: str,
    tmp_path: Path,
) -> None:
    """A saved block, loaded back (as a deployment run resolves a block reference)."""
    bucket_block(local_s3, s3_bucket, folder="batches").save(f"bucket-{unique}")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": f"a ferry {unique}", "quality": "low"}) + "\n")
    summary = batch_to_s3(
        str(path),
        bucket=S3Bucket.load(f"bucket-{unique}"),
        prefix="explicit",
        output_dir=str(tmp_path / "o"),
    )
    assert isinstance(summary, RunSummary) and summary.staged == 1
    keys = [
        o["Key"] for o in local_s3.client().list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    ]
    assert keys and all(k.startswith("explicit/") for k in keys)


# -- partly failed batches --------------------------------------------------------------------


def test_batch_incomplete_carries_the_summary_and_pickles() -> None:
    summary = RunSummary(
        images_total=1,
        failures=[Failure(prompt="p", reason="boom", error_type="x", endpoint="fal-ai/e")],
    )
    exc = BatchIncomplete(summary)
    assert str(exc) == "1 request(s) failed" and not exc.transient
    back = cloudpickle.loads(cloudpickle.dumps(exc))
    assert isinstance(back, BatchIncomplete) and back.summary == summary
    assert str(back) == str(exc) and back.message == exc.message


def test_partly_failed_batch_raises_with_its_summary(
    fal_emulator: FalEmulator, local_s3: LocalS3Server, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    fal_emulator.inject(Fault("submit", "fail", status_code=422, match=f"bad {unique}"))
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": f"good {unique}", "quality": "low"}, {"prompt": f"bad {unique}"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BatchIncomplete) as info:
        batch_to_s3(str(path), bucket=s3_bucket, output_dir=str(tmp_path / "o"))
    assert len(info.value.summary.images) == 1 and len(info.value.summary.failures) == 1
    assert info.value.summary.manifest_uri is not None

    state = batch_to_s3(
        str(path), bucket=s3_bucket, output_dir=str(tmp_path / "o"), return_state=True
    )
    assert state.is_failed() and state.message == "1 request(s) failed"
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, BatchIncomplete)
    assert exc.summary.submitted == 0 and len(exc.summary.failures) == 1  # the good row: cached
