"""Before the first submit, every flow checks that the images can land (issue 12, item 3).

Against the suite's real moto S3 server: a missing bucket, an invalid name, an unreachable
endpoint, a bad budget and an untrusted fal media host each fail with one error and
``fal_emulator.stats["submit"]`` unchanged. moto's server does not enforce bucket policies, so
AccessDenied (and a write-only credential) are shown with botocore's Stubber on a real client.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from prefect_gptimage.errors import (
    ConfigurationError,
    InvalidRequestError,
    PermanentS3StagingError,
    S3StagingError,
)
from prefect_gptimage.fal.media import MediaPolicy
from prefect_gptimage.flows import (
    _preflight,
    batch_to_s3,
    generate_then_edit,
    generate_to_s3,
    scheduled_content,
)
from prefect_gptimage.s3 import S3Target, reset_s3_clients
from prefect_gptimage.s3.preflight import PROBE_NAME, probe_bucket, validate_bucket_name
from prefect_gptimage.schemas import GptImageRequest
from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

# -- bucket names, locally ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Bad_Bucket!",
        "b",
        "ab",
        "x" * 64,
        "UPPER",
        "under_score",
        "-leading",
        "trailing-",
        "a..b",
        "a.-b",
        "192.168.1.1",
        "xn--bucket",
        "my-bucket-s3alias",
        "with space",
        "slash/inside",
        "",
    ],
)
def test_invalid_bucket_names_are_refused_locally(name: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_bucket_name(name)
    assert info.value.field == "bucket"


@pytest.mark.parametrize(
    "name",
    [
        "abc",
        "my-images",
        "my.images.2026",
        "x" * 63,
        "bucket-base--usw2-az1--x-s3",
        "arn:aws:s3:us-east-1:123456789012:accesspoint/images",
    ],
)
def test_valid_bucket_names_pass(name: str) -> None:
    assert validate_bucket_name(name) == name


# -- the probe -----------------------------------------------------------------------------------


def test_probe_writes_and_cleans_up(s3: LocalS3Server, s3_bucket: str) -> None:
    probe_bucket(S3Target(bucket=s3_bucket, prefix="team/images"))
    assert s3.client().list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0


def test_probe_of_a_missing_bucket_is_permanent(s3: LocalS3Server, unique: str) -> None:
    with pytest.raises(PermanentS3StagingError) as info:
        probe_bucket(S3Target(bucket=f"missing-{unique}"))
    assert info.value.code == "NoSuchBucket" and f"missing-{unique}" in str(info.value)


def stubbed_client() -> tuple[Any, Stubber]:
    client = boto3.client(
        "s3",
        region_name="us-east-1",
        aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
        aws_secret_access_key="x",
        endpoint_url="http://127.0.0.1:1",
    )
    return client, Stubber(client)


def test_access_denied_on_the_write_is_permanent() -> None:
    """(moto's server does not enforce bucket policies: the denial comes from a Stubber.)"""
    client, stub = stubbed_client()
    stub.add_client_error("put_object", "AccessDenied", "Access Denied", 403)
    with stub, pytest.raises(PermanentS3StagingError) as info:
        probe_bucket(S3Target(bucket="locked-bucket"), client)
    assert info.value.code == "AccessDenied" and "AKIA" not in str(info.value)


@pytest.mark.parametrize("code", ["InvalidAccessKeyId", "SignatureDoesNotMatch"])
def test_a_bad_key_is_permanent(code: str) -> None:
    client, stub = stubbed_client()
    stub.add_client_error("put_object", code, "The key is wrong", 403)
    with stub, pytest.raises(PermanentS3StagingError) as info:
        probe_bucket(S3Target(bucket="some-bucket"), client)
    assert info.value.code == code


def test_a_write_only_credential_passes() -> None:
    """PutObject allowed, DeleteObject denied: staging never deletes, so the run may go on."""
    client, stub = stubbed_client()
    stub.add_response("put_object", {"ETag": '"d41d8cd98f00b204e9800998ecf8427e"'})
    stub.add_client_error("delete_object", "AccessDenied", "Access Denied", 403)
    with stub:
        probe_bucket(S3Target(bucket="drop-box", prefix="in"), client)
        stub.assert_no_pending_responses()


# -- the flows: one error, nothing submitted --------------------------------------------------


def prompt_file(tmp_path: Path, unique: str) -> str:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": f"a buoy {unique}", "quality": "low"}) + "\n")
    return str(path)


FlowCall = Callable[[Any, str, Path], object]


def call_batch(bucket: Any, unique: str, tmp_path: Path) -> object:
    return batch_to_s3(prompt_file(tmp_path, unique), bucket=bucket, output_dir=str(tmp_path))


def call_generate(bucket: Any, unique: str, tmp_path: Path) -> object:
    request = GptImageRequest(prompt=f"a buoy {unique}", quality="low")
    return generate_to_s3(request, bucket=bucket, output_dir=str(tmp_path))


def call_edit(bucket: Any, unique: str, tmp_path: Path) -> object:
    return generate_then_edit(
        f"a buoy {unique}", f"at night {unique}", bucket=bucket, output_dir=str(tmp_path)
    )


def call_scheduled(bucket: Any, unique: str, tmp_path: Path) -> object:
    return scheduled_content(
        f"a buoy on {{date}} {unique}", bucket=bucket, date="2026-11-24", output_dir=str(tmp_path)
    )


FLOWS = pytest.mark.parametrize(
    "call", [call_batch, call_generate, call_edit, call_scheduled], ids=lambda f: f.__name__
)


@FLOWS
def test_missing_bucket_submits_nothing(
    fal_emulator: FalEmulator, s3: LocalS3Server, unique: str, tmp_path: Path, call: FlowCall
) -> None:
    before = fal_emulator.stats["submit"]
    with pytest.raises(PermanentS3StagingError, match="NoSuchBucket"):
        call(f"missing-{unique}", unique, tmp_path)
    assert fal_emulator.stats["submit"] == before


@FLOWS
@pytest.mark.parametrize("name", ["Bad_Bucket!", "b"])
def test_invalid_bucket_name_submits_nothing(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path, call: FlowCall, name: str
) -> None:
    before = fal_emulator.stats["submit"]
    with pytest.raises(InvalidRequestError) as info:
        call(name, unique, tmp_path)
    assert info.value.field == "bucket" and repr(name) in str(info.value)
    assert fal_emulator.stats["submit"] == before


@pytest.fixture
def s3_stopped(monkeypatch: pytest.MonkeyPatch, s3: LocalS3Server) -> Iterator[None]:
    """boto3's standard chain points at a port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    reset_s3_clients()
    yield
    reset_s3_clients()


def test_unreachable_s3_submits_nothing(
    fal_emulator: FalEmulator,
    s3_stopped: None,
    unique: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PREFECT_GPTIMAGE_RETRY_BUDGET", "2")  # S3 is retried within the budget
    before = fal_emulator.stats["submit"]
    with pytest.raises(S3StagingError, match="preflight write"):
        call_generate("some-bucket", unique, tmp_path)
    assert fal_emulator.stats["submit"] == before


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -float("inf"), -0.01])
def test_a_budget_that_is_not_a_finite_number_submits_nothing(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path, budget: float
) -> None:
    before = fal_emulator.stats["submit"]
    with pytest.raises(InvalidRequestError) as info:
        batch_to_s3(prompt_file(tmp_path, unique), max_cost=budget, output_dir=str(tmp_path))
    assert info.value.field == "max_cost"
    assert fal_emulator.stats["submit"] == before


def test_dry_run_checks_locally_and_writes_nothing(
    fal_emulator: FalEmulator, s3: LocalS3Server, unique: str, tmp_path: Path
) -> None:
    before = fal_emulator.stats["submit"]
    with pytest.raises(InvalidRequestError):
        batch_to_s3(prompt_file(tmp_path, unique), bucket="Bad_Bucket!", dry_run=True)
    with pytest.raises(InvalidRequestError):
        batch_to_s3(prompt_file(tmp_path, unique), max_cost=float("nan"), dry_run=True)
    # a dry run makes no network call: a missing bucket is found by the real run
    summary = batch_to_s3(prompt_file(tmp_path, unique), bucket=f"missing-{unique}", dry_run=True)
    assert summary.estimated_cost_usd > 0  # type: ignore[union-attr]
    assert fal_emulator.stats["submit"] == before


# -- the fal host must be trusted for media ----------------------------------------------------


def test_untrusted_fal_media_host_submits_nothing(
    fal_emulator: FalEmulator,
    s3: LocalS3Server,
    s3_bucket: str,
    unique: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        _preflight, "media_policy", lambda: MediaPolicy(allowed_hosts=("*.fal.media",))
    )
    before = fal_emulator.stats["submit"]
    with pytest.raises(ConfigurationError, match="FAL_QUEUE_RUN_HOST"):
        call_batch(s3_bucket, unique, tmp_path)
    with pytest.raises(ConfigurationError, match="PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS"):
        call_scheduled(s3_bucket, unique, tmp_path)
    assert fal_emulator.stats["submit"] == before


@pytest.mark.parametrize(
    ("value", "allowed", "ok"),
    [
        (None, (), True),  # fal's own queue: media from *.fal.media
        ("queue.fal.run", (), True),
        ("gateway.example:8443", ("gateway.example",), True),
        ("gateway.example:8443", ("*.example",), True),
        ("gateway.example:8443", ("fal.media", "*.fal.media"), False),
        ("not a host", ("*",), False),
    ],
)
def test_fal_media_host_rule(
    monkeypatch: pytest.MonkeyPatch, value: str | None, allowed: tuple[str, ...], ok: bool
) -> None:
    if value is None:
        monkeypatch.delenv("FAL_QUEUE_RUN_HOST", raising=False)
    else:
        monkeypatch.setenv("FAL_QUEUE_RUN_HOST", value)
    monkeypatch.setattr(_preflight, "media_policy", lambda: MediaPolicy(allowed_hosts=allowed))
    if ok:
        _preflight.check_fal_media_host()
    else:
        with pytest.raises(ConfigurationError):
            _preflight.check_fal_media_host()


def test_probe_name_is_stable() -> None:
    assert PROBE_NAME == ".gptimage-preflight"
