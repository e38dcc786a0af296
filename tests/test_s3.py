"""S3 staging against a real S3 protocol endpoint (moto in server mode, over HTTP) and a real
Prefect engine. Nothing in boto3 is mocked: failures come from a missing bucket or a closed port.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from PIL import Image
from prefect import flow
from prefect.client.orchestration import get_client
from pydantic import ValidationError

from prefect_gptimage.errors import (
    GptImageError,
    PermanentS3StagingError,
    TransientS3StagingError,
)
from prefect_gptimage.retry import RetryPolicy, is_transient_s3_error
from prefect_gptimage.s3 import (
    MAX_PRESIGN_EXPIRES,
    S3Target,
    StagedFile,
    StagedImage,
    client_from_block,
    get_s3_client,
    image_key,
    manifest_key,
    normalize_prefix,
    presign,
    safe_id,
    slugify,
    stage_file,
    stage_image,
    stage_image_task,
    stage_manifest_task,
    target_from_bucket_block,
)
from prefect_gptimage.s3.failures import s3_error
from prefect_gptimage.schemas import (
    CONTENT_TYPES,
    DownloadedImage,
    GptImageEditRequest,
    GptImageRequest,
)
from prefect_gptimage.testing.s3 import LocalS3Server

MiB = 1024 * 1024
#: S3 calls retry within the package's budget (60 s by default): short here
QUICK = RetryPolicy(budget=1.5, initial_delay=0.05, max_delay=0.2)
T2I = "fal-ai/gpt-image-1.5"
EDIT = "fal-ai/gpt-image-1.5/edit"


@pytest.fixture
def bucket(s3: LocalS3Server) -> str:
    name = f"stage-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(name)
    return name


def make_image(
    folder: Path,
    *,
    fmt: str = "png",
    size: tuple[int, int] = (64, 48),
    noise: bool = False,
    request_id: str | None = None,
    endpoint: str = T2I,
    index: int = 0,
) -> DownloadedImage:
    """A real image file on disk and its verified record (sha256 computed)."""
    if noise:  # incompressible, so the file is about width*height*3 bytes
        img = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    else:
        img = Image.new("RGB", size, (200, 40, 90))
    path = folder / f"{uuid.uuid4().hex}.{fmt}"
    img.save(path, format="JPEG" if fmt == "jpeg" else fmt.upper())
    data = path.read_bytes()
    return DownloadedImage(
        path=str(path),
        source_url="https://v3.fal.media/files/x/out." + fmt,
        request_id=request_id or str(uuid.uuid4()),
        endpoint=endpoint,
        index=index,
        content_type=CONTENT_TYPES[fmt],
        format=fmt,  # type: ignore[arg-type]
        width=size[0],
        height=size[1],
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def client_for(endpoint_url: str) -> Any:
    """A client with botocore retries off, so one task attempt is one HTTP try."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=2),
    )


def count_calls(client: Any) -> dict[str, int]:
    """Count real S3 operations made through ``client`` (botocore event hook, no mocking)."""
    calls: dict[str, int] = {}

    def hook(model: Any, **_: Any) -> None:
        calls[model.name] = calls.get(model.name, 0) + 1

    client.meta.events.register("before-call.s3", hook)
    return calls


def task_run_states(task_run_id: Any) -> list[str]:
    with get_client(sync_client=True) as client:
        states = client.read_task_run_states(task_run_id)
    return [s.type.value for s in sorted(states, key=lambda s: s.timestamp)]


REQUEST = GptImageRequest(prompt="xy", quality="low", image_size="1024x1024", num_images=1)

# ---------------------------------------------------------------------------------------------
# Key layout
# ---------------------------------------------------------------------------------------------

KEY_RE = re.compile(r"^[A-Za-z0-9._/-]+$")
LAST_RE = re.compile(r"^\d{2}-[a-z0-9-]{1,48}\.(png|jpg|webp)$")


def assert_safe_key(key: str) -> None:
    assert KEY_RE.match(key), key
    assert not key.startswith("/")
    assert all(seg not in ("", ".", "..") for seg in key.split("/")), key
    assert len(key.encode()) <= 1024


def test_key_layout_is_documented_and_deterministic() -> None:
    rid = "764cabcf-b745-4b3e-ae38-1200304cf45b"
    key = image_key(
        "gptimage", endpoint=T2I, request_id=rid, index=1, prompt="A Lighthouse, dawn", fmt="png"
    )
    assert key == f"gptimage/fal-ai-gpt-image-1-5/{rid}/01-a-lighthouse-dawn.png"
    again = image_key(
        S3Target(bucket="bucket-x", prefix="gptimage"),
        endpoint=T2I,
        request_id=rid,
        index=1,
        prompt="A Lighthouse, dawn",
        fmt="png",
    )
    assert again == key
    edit = image_key("p", endpoint=EDIT, request_id=rid, index=0, prompt="x y", fmt="jpeg")
    assert edit == f"p/fal-ai-gpt-image-1-5-edit/{rid}/00-x-y.jpg"
    assert manifest_key("gptimage", "nightly-7") == "gptimage/manifests/nightly-7.jsonl"


@pytest.mark.parametrize(
    "prompt",
    [
        "../../etc/passwd",
        "/absolute/path/../../x",
        "..",
        "日本語のプロンプト",
        "Crème brûlée à la 🔥 émoji",
        "a" * 5000,
        "\x00\x01\x1f\x7f\n\r\t control",
        "%2e%2e%2f%2e%2e%2f",
        "CON NUL <script>alert(1)</script> ; rm -rf /",
        "   ",
        "",
    ],
)
def test_hostile_prompts_never_reach_the_key(prompt: str) -> None:
    key = image_key("gptimage", endpoint=T2I, request_id="r-1", index=0, prompt=prompt, fmt="webp")
    assert_safe_key(key)
    assert key.startswith("gptimage/fal-ai-gpt-image-1-5/r-1/")
    last = key.rsplit("/", 1)[1]
    assert LAST_RE.match(last), last
    assert key.count("/") == 3


def test_prompt_slug_rules() -> None:
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("Crème brûlée") == "creme-brulee"
    assert slugify("日本語") == "image"
    assert slugify("") == "image"
    long = slugify("word " * 1000)
    assert len(long) <= 48 and not long.endswith("-")


@pytest.mark.parametrize(
    "request_id", ["../../x", "/etc/passwd", "a/b", "ü-id", "a" * 300, "", "..", "id with space"]
)
def test_hostile_request_ids_are_sanitized(request_id: str) -> None:
    key = image_key("g", endpoint=T2I, request_id=request_id, index=2, prompt="p", fmt="png")
    assert_safe_key(key)
    assert key.count("/") == 3
    assert len(key.split("/")[2]) <= 64


def test_sanitized_ids_do_not_collide() -> None:
    ids = ["a/b", "a-b", "a_b", "a b", "a//b", "A/B", "a" * 300, "a" * 301]
    keys = {image_key("g", endpoint=T2I, request_id=i, index=0, prompt="p", fmt="png") for i in ids}
    assert len(keys) == len(ids)
    assert safe_id("764cabcf-b745") == "764cabcf-b745"  # fal's ids pass unchanged
    assert manifest_key("g", "../evil/run") != manifest_key("g", "evil-run")
    assert_safe_key(manifest_key("/../", "../../x\x00y"))


def test_prefix_is_normalized() -> None:
    assert normalize_prefix("/../a//b/./c/") == "a/b/c"
    assert normalize_prefix("..") == ""
    assert normalize_prefix("team name/ü") == "team-name"
    assert S3Target(bucket="bucket-x", prefix="//x/../y//").prefix == "x/y"
    key = image_key("", endpoint=T2I, request_id="r", index=0, prompt="p", fmt="png")
    assert key == "fal-ai-gpt-image-1-5/r/00-p.png"


def test_unknown_format_and_negative_index_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported image format"):
        image_key("g", endpoint=T2I, request_id="r", index=0, prompt="p", fmt="gif")
    with pytest.raises(ValueError, match="index"):
        image_key("g", endpoint=T2I, request_id="r", index=-1, prompt="p", fmt="png")


@pytest.mark.parametrize("expires", [0, -5, MAX_PRESIGN_EXPIRES + 1, 30 * 24 * 3600])
def test_presign_expiry_out_of_range_is_rejected(expires: int) -> None:
    with pytest.raises(ValidationError, match="7 days"):
        S3Target(bucket="bucket-x", presign_expires=expires)
    with pytest.raises(ValueError, match="7 days"):
        presign("bucket-x", "k", expires)


def test_target_defaults_and_part_size_floor() -> None:
    target = S3Target(bucket="bucket-x")
    assert target.presign_expires == 86400
    assert target.prefix == "gptimage"
    assert target.multipart_threshold == 8 * MiB
    assert S3Target(bucket="bucket-x", presign_expires=MAX_PRESIGN_EXPIRES).presign_expires
    with pytest.raises(ValidationError, match="5 MiB"):
        S3Target(bucket="bucket-x", multipart_threshold=MiB)
    with pytest.raises(ValidationError):
        S3Target(bucket="a/b")


# ---------------------------------------------------------------------------------------------
# Error classification
# ---------------------------------------------------------------------------------------------


def client_error(code: str, status: int) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": "m"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "PutObject")


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (client_error("SlowDown", 503), True),
        (client_error("Throttling", 400), True),
        (client_error("RequestTimeout", 400), True),
        (client_error("InternalError", 500), True),
        (client_error("ServiceUnavailable", 503), True),
        (client_error("SomethingNew", 502), True),
        (client_error("TooManyRequests", 429), True),
        (client_error("AccessDenied", 403), False),
        (client_error("NoSuchBucket", 404), False),
        (client_error("InvalidAccessKeyId", 403), False),
        (client_error("SignatureDoesNotMatch", 403), False),
        (client_error("InvalidArgument", 400), False),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
        (NoCredentialsError(), False),
        (FileNotFoundError("x"), False),
        (ValueError("x"), False),
    ],
)
def test_is_transient_s3_error(exc: BaseException, transient: bool) -> None:
    assert is_transient_s3_error(exc) is transient
    wrapped = s3_error(exc, bucket="bkt", key="k/x.png", operation="upload")
    assert isinstance(wrapped, GptImageError)
    assert wrapped.transient is transient
    assert isinstance(wrapped, TransientS3StagingError if transient else PermanentS3StagingError)
    assert "s3://bkt/k/x.png" in str(wrapped)


def test_boto3_upload_wrapper_is_unwrapped() -> None:
    """boto3 turns ClientError into S3UploadFailedError; the code is still found."""
    for code, status, transient in (("SlowDown", 503, True), ("NoSuchBucket", 404, False)):
        try:
            try:
                raise client_error(code, status)
            except ClientError as inner:
                raise S3UploadFailedError(f"Failed to upload: {inner}")  # noqa: B904 (as boto3)
        except S3UploadFailedError as exc:
            assert is_transient_s3_error(exc) is transient
            err = s3_error(exc, bucket="b", key="k", operation="upload")
            assert err.code == code


def test_error_messages_redact_signatures() -> None:
    exc = EndpointConnectionError(
        endpoint_url="http://h/b/k?X-Amz-Credential=AKIAABCDEFGHIJKLMNOP%2F&X-Amz-Signature=deadbeef"
    )
    err = s3_error(exc, bucket="b", key="k", operation="GET")
    assert "deadbeef" not in str(err)
    assert "AKIAABCDEFGHIJKLMNOP" not in str(err)


# ---------------------------------------------------------------------------------------------
# Staging over HTTP
# ---------------------------------------------------------------------------------------------


def test_stage_image_sets_content_type_and_ascii_metadata(
    s3: LocalS3Server, bucket: str, tmp_path: Path
) -> None:
    prompt = "Ünïcödé prompt — with «quotes» and 日本語"
    image = make_image(tmp_path, fmt="jpeg", size=(40, 30), endpoint=EDIT, index=2)
    request = GptImageEditRequest(
        prompt=prompt, quality="medium", image_size="1536x1024", image_urls=["https://a/u.png"]
    )
    staged = stage_image(image, prompt=prompt, request=request, target=S3Target(bucket=bucket))

    assert staged.uploaded is True
    assert staged.key.endswith("/02-unicode-prompt-with-quotes-and.jpg")
    assert staged.s3_uri == f"s3://{bucket}/{staged.key}"
    assert (staged.width, staged.height, staged.index) == (40, 30, 2)
    head = s3.client().head_object(Bucket=bucket, Key=staged.key)
    assert head["ContentType"] == "image/jpeg"
    assert head["ContentLength"] == image.bytes
    meta = head["Metadata"]
    assert meta == {
        "request-id": image.request_id,
        "endpoint": EDIT,
        "index": "2",
        "prompt-sha256": hashlib.sha256(prompt.encode()).hexdigest(),
        "sha256": image.sha256,
        "quality": "medium",
        "image-size": "1536x1024",
        "format": "jpeg",
        "width": "40",
        "height": "30",
    }
    assert all(v.isascii() for v in meta.values())
    # private: no public-read grant
    acl = s3.client().get_object_acl(Bucket=bucket, Key=staged.key)
    assert not [g for g in acl["Grants"] if "AllUsers" in str(g.get("Grantee", {}))]


def test_restage_is_idempotent_no_second_put(
    s3: LocalS3Server, bucket: str, tmp_path: Path
) -> None:
    image = make_image(tmp_path)
    client = client_for(s3.endpoint_url)
    calls = count_calls(client)
    target = S3Target(bucket=bucket)
    first = stage_image(image, prompt="same", request=REQUEST, target=target, client=client)
    before = s3.client().head_object(Bucket=bucket, Key=first.key)
    time.sleep(1.1)  # LastModified has one-second resolution
    second = stage_image(image, prompt="same", request=REQUEST, target=target, client=client)
    after = s3.client().head_object(Bucket=bucket, Key=first.key)

    assert (first.uploaded, second.uploaded) == (True, False)
    assert second.key == first.key
    assert calls.get("PutObject") == 1
    assert calls.get("HeadObject") == 2
    assert after["ETag"] == before["ETag"]
    assert after["LastModified"] == before["LastModified"]
    listing = s3.client().list_objects_v2(Bucket=bucket)
    assert listing["KeyCount"] == 1


def test_large_body_goes_multipart(s3: LocalS3Server, bucket: str, tmp_path: Path) -> None:
    big = make_image(tmp_path, size=(1500, 1500), noise=True)
    assert big.bytes > 6 * MiB
    target = S3Target(
        bucket=bucket, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2
    )
    staged = stage_image(big, prompt="noise", request=REQUEST, target=target)
    etag = s3.client().head_object(Bucket=bucket, Key=staged.key)["ETag"].strip('"')
    assert etag.endswith("-2"), etag  # two parts of 5 MiB + rest
    small = stage_image(make_image(tmp_path), prompt="small", request=REQUEST, target=target)
    small_etag = s3.client().head_object(Bucket=bucket, Key=small.key)["ETag"].strip('"')
    assert "-" not in small_etag


def test_presigned_url_is_downloadable(s3: LocalS3Server, bucket: str, tmp_path: Path) -> None:
    image = make_image(tmp_path)
    target = S3Target(bucket=bucket, presign_expires=120)
    staged = stage_image(image, prompt="dl", request=REQUEST, target=target)
    assert "X-Amz-Expires=120" in staged.url
    response = httpx.get(staged.url, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert hashlib.sha256(response.content).hexdigest() == image.sha256
    week = presign(bucket, staged.key, MAX_PRESIGN_EXPIRES)
    assert "X-Amz-Expires=604800" in week
    assert httpx.get(week, timeout=10).content == Path(image.path).read_bytes()


def test_missing_bucket_is_permanent_and_named(s3: LocalS3Server, tmp_path: Path) -> None:
    image = make_image(tmp_path)
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(PermanentS3StagingError) as info:
        stage_image(image, prompt="p", request=REQUEST, target=S3Target(bucket=missing))
    err = info.value
    assert err.transient is False
    assert err.code == "NoSuchBucket"
    assert missing in str(err) and "NoSuchBucket" in str(err)
    assert "testing" not in str(err)  # the (test) secret never appears


def test_closed_port_is_transient(tmp_path: Path) -> None:
    client = client_for(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(TransientS3StagingError) as info:
        stage_image(
            make_image(tmp_path),
            prompt="p",
            request=REQUEST,
            target=S3Target(bucket="bucket-x"),
            client=client,
            retry=QUICK,
        )
    assert info.value.code == "EndpointConnectionError"
    assert is_transient_s3_error(info.value)


def test_changed_local_file_is_refused(s3: LocalS3Server, bucket: str, tmp_path: Path) -> None:
    image = make_image(tmp_path)
    with open(image.path, "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(PermanentS3StagingError, match="bytes"):
        stage_image(image, prompt="p", request=REQUEST, target=S3Target(bucket=bucket))


def test_stage_file_and_unsafe_keys(s3: LocalS3Server, bucket: str, tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"kind": "image"}\n')
    target = S3Target(bucket=bucket)
    staged = stage_file(path, manifest_key(target, "run 1"), "application/x-ndjson", target)
    assert staged.key.startswith("gptimage/manifests/run-1-")
    assert httpx.get(staged.url).text == '{"kind": "image"}\n'
    for bad in ("../x", "/abs/x", "a//b", "a/./b", "a/ü", ""):
        with pytest.raises(ValueError, match="unsafe S3 key"):
            stage_file(path, bad, "text/plain", target)


def test_one_client_shared_across_threads(s3: LocalS3Server) -> None:
    seen: list[Any] = []
    threads = [threading.Thread(target=lambda: seen.append(get_s3_client())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in seen}) == 1
    assert seen[0].meta.config.retries["mode"] == "standard"


def test_prefect_aws_blocks_are_accepted(s3: LocalS3Server, bucket: str, tmp_path: Path) -> None:
    """The real prefect-aws S3Bucket/AwsCredentials blocks (a core dependency)."""
    from prefect_aws import AwsCredentials, S3Bucket

    from prefect_gptimage.s3.clients import resolve_client, use_s3_client

    credentials = AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        aws_client_parameters={"endpoint_url": s3.endpoint_url},
    )
    block = S3Bucket(bucket_name=bucket, bucket_folder="from-block", credentials=credentials)
    target = target_from_bucket_block(block)
    assert (target.bucket, target.prefix) == (bucket, "from-block")
    assert target_from_bucket_block(block, prefix="mine").prefix == "mine"
    staged = stage_image(
        make_image(tmp_path), prompt="p", request=REQUEST, target=target, client=block
    )
    assert staged.key.startswith("from-block/") and staged.uploaded
    client = client_from_block(block)
    assert client is client_from_block(block.credentials)
    assert client.meta.endpoint_url == s3.endpoint_url
    assert client.meta.config.retries["mode"] == "standard"  # our defaults, their endpoint
    assert resolve_client(credentials) is client
    assert httpx.get(staged.url).status_code == 200
    # inside use_s3_client, client=None means the flow's client; outside, the shared default
    with use_s3_client(client):
        assert resolve_client(None) is client
    assert resolve_client(None) is get_s3_client()
    with pytest.raises(TypeError, match="not a prefect-aws"):
        client_from_block(object())  # type: ignore[arg-type]


def test_local_s3_server_helper() -> None:
    server = LocalS3Server()
    with pytest.raises(RuntimeError):
        _ = server.endpoint_url
    with server:
        env = server.env()
        assert env["AWS_ENDPOINT_URL_S3"] == server.endpoint_url
        assert env["AWS_ACCESS_KEY_ID"] == "testing"
        assert env["AWS_DEFAULT_REGION"] == "us-east-1"
        server.create_bucket("helper-bucket")
        server.create_bucket("helper-bucket")  # idempotent
        names = [b["Name"] for b in server.client().list_buckets()["Buckets"]]
        assert "helper-bucket" in names
    assert not server.running


# ---------------------------------------------------------------------------------------------
# Prefect tasks (real engine)
# ---------------------------------------------------------------------------------------------


def test_tasks_add_no_prefect_retries() -> None:
    """The staging call retries itself (one layer, the package's budget), not the task."""
    for t in (stage_image_task, stage_manifest_task):
        assert t.retries == 0


def test_task_rides_out_an_outage_within_one_attempt(
    prefect_api: None, s3: LocalS3Server, bucket: str, tmp_path: Path
) -> None:
    """The S3 endpoint is down for the first tries and comes up: the same task run succeeds."""
    port = closed_port()
    client = client_for(f"http://127.0.0.1:{port}")
    calls = count_calls(client)
    refused = threading.Event()
    client.meta.events.register("after-call-error.s3", lambda **_: refused.set())
    revived: list[LocalS3Server] = []

    def revive() -> None:  # once a try has met the closed port (botocore's event, not a sleep)
        refused.wait(120)
        revived.append(LocalS3Server(port=port).start())  # same moto backend: bucket exists

    timer = threading.Thread(target=revive)
    image = make_image(tmp_path)

    @flow
    def stage_flow() -> dict[str, Any]:
        target = S3Target(bucket=bucket)
        policy = RetryPolicy(budget=20, initial_delay=0.05, max_delay=0.3)
        state = stage_image_task(
            image, "retry me", REQUEST, target, client, policy, return_state=True
        )
        result = state.result(raise_on_failure=False)
        assert isinstance(result, StagedImage), result
        return {"id": state.state_details.task_run_id, "uploaded": result.uploaded}

    timer.start()
    try:
        out = stage_flow()
    finally:
        timer.join()
        for server in revived:
            server.stop()
    assert out["uploaded"] is True
    assert refused.is_set() and calls["HeadObject"] >= 2  # refused, then retried in the task
    states = task_run_states(out["id"])
    assert states.count("RUNNING") == 1 and states[-1] == "COMPLETED"
    assert (
        s3.client().head_object(
            Bucket=bucket,
            Key=image_key(
                "gptimage",
                endpoint=T2I,
                request_id=image.request_id,
                index=0,
                prompt="retry me",
                fmt="png",
            ),
        )["Metadata"]["sha256"]
        == image.sha256
    )


def test_task_gives_up_when_the_budget_runs_out(prefect_api: None, tmp_path: Path) -> None:
    client = client_for(f"http://127.0.0.1:{closed_port()}")
    calls = count_calls(client)
    image = make_image(tmp_path)

    @flow
    def stage_flow() -> dict[str, Any]:
        target = S3Target(bucket="bucket-x")
        state = stage_image_task(image, "p", REQUEST, target, client, QUICK, return_state=True)
        exc = state.result(raise_on_failure=False)
        return {"id": state.state_details.task_run_id, "error": str(exc), "type": type(exc)}

    out = stage_flow()
    assert out["type"].__name__ == "TransientS3StagingError"
    assert "gave up after" in out["error"]
    assert calls["HeadObject"] >= 2  # retried by the call, within its budget
    states = task_run_states(out["id"])
    assert states.count("RUNNING") == 1  # not by Prefect
    assert states[-1] == "FAILED"


def test_task_does_not_retry_permanent_errors(
    prefect_api: None, s3: LocalS3Server, tmp_path: Path
) -> None:
    client = client_for(s3.endpoint_url)
    calls = count_calls(client)
    image = make_image(tmp_path)
    target = S3Target(bucket=f"missing-{uuid.uuid4().hex[:8]}")

    @flow
    def stage_flow() -> dict[str, Any]:
        state = stage_image_task(image, "p", REQUEST, target, client, return_state=True)
        exc = state.result(raise_on_failure=False)
        return {"id": state.state_details.task_run_id, "error": type(exc).__name__}

    out = stage_flow()
    assert out["error"] == "PermanentS3StagingError"
    assert calls.get("PutObject", 0) + calls.get("CreateMultipartUpload", 0) == 1
    assert task_run_states(out["id"]).count("RUNNING") == 1


def test_stage_manifest_task(
    prefect_api: None, s3: LocalS3Server, bucket: str, tmp_path: Path
) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"kind": "failure"}\n')
    target = S3Target(bucket=bucket, prefix="runs")

    @flow
    def manifest_flow() -> StagedFile:
        return stage_manifest_task(str(path), "nightly-2026-11-24", target)

    staged = manifest_flow()
    assert staged.key == "runs/manifests/nightly-2026-11-24.jsonl"
    head = s3.client().head_object(Bucket=bucket, Key=staged.key)
    assert head["ContentType"] == "application/x-ndjson"
    assert httpx.get(staged.url).text == '{"kind": "failure"}\n'
