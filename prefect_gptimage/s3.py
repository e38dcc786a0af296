"""Stage verified images (and run manifests) in S3, privately, idempotently, with presigned links.

Modelled on prefect-aws: plain functions and classes do the work, Prefect tasks are thin wrappers
that add retries. Uploads go through boto3's managed transfer (``client.upload_file`` with a
:class:`boto3.s3.transfer.TransferConfig`), which streams from the local file and switches to a
multipart upload above ``S3Target.multipart_threshold``: no image, and no batch, is ever held in
memory whole.

Configuration
    Credentials, region and endpoint come from boto3's standard chain only: ``AWS_*`` environment
    variables, profiles, instance roles, and ``AWS_ENDPOINT_URL_S3`` (which points the client at
    MinIO, moto or LocalStack without any code change). One client per process is built and reused
    (boto3 clients are thread-safe, sessions are not); see :func:`get_s3_client`. When the optional
    ``prefect-aws`` extra is installed, a prefect-aws ``AwsCredentials``/``MinIOCredentials`` or
    ``S3Bucket`` block may be passed wherever a ``client`` is accepted (imported by duck typing,
    never at module import).

Key layout (documented, deterministic, collision-free)
    ::

        {prefix}/{endpoint-slug}/{request-id}/{index:02d}-{prompt-slug}.{ext}
        {prefix}/manifests/{run-key}.jsonl
        {prefix}/manifests/{run-key}.html

    * ``prefix`` is normalized: split on ``/``; each segment keeps only ``[A-Za-z0-9._-]`` (anything
      else becomes ``-``); empty, ``.`` and ``..`` segments are dropped; so no leading ``/``, no
      ``//``, no traversal. An empty prefix puts the endpoint slug at the top of the bucket.
    * ``endpoint-slug`` is the fal endpoint as a lowercase ``[a-z0-9-]`` slug
      (``fal-ai/gpt-image-1.5/edit`` -> ``fal-ai-gpt-image-1-5-edit``).
    * ``request-id`` keeps ``[A-Za-z0-9_-]`` (fal's UUIDs pass unchanged). If sanitizing had to
      change or truncate the id, 10 hex digits of the SHA-256 of the raw id are appended, so two
      distinct ids never share a folder.
    * ``index`` is the image's position in its request's output, zero padded: with the request id it
      makes the key unique. The prompt slug only helps humans browsing the bucket.
    * ``prompt-slug`` is the prompt reduced to lowercase ASCII ``[a-z0-9-]`` (accents folded,
      everything else dropped or dashed), at most 48 characters, ``image`` when nothing is left.
    * ``ext`` is ``png``, ``jpg`` or ``webp`` from the verified image format.
    * ``run-key`` is sanitized like a request id.

    Nothing from a prompt, a request id or a fal ``file_name`` reaches a key unsanitized, and the
    same image always maps to the same key, which is what makes re-staging idempotent.

Example:
    >>> image_key("gptimage", endpoint="fal-ai/gpt-image-1.5", request_id="764cabcf-b745",
    ...           index=0, prompt="A Lighthouse at Dawn!", fmt="png")
    'gptimage/fal-ai-gpt-image-1-5/764cabcf-b745/00-a-lighthouse-at-dawn.png'
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import threading
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Union

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    ProxyConnectionError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ConfigDict, Field, field_validator

from prefect_gptimage.errors import GptImageError
from prefect_gptimage.retry import retry_if_transient
from prefect_gptimage.schemas import DownloadedImage

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = [
    "MANIFEST_CONTENT_TYPE",
    "MAX_PRESIGN_EXPIRES",
    "PermanentS3StagingError",
    "S3StagingError",
    "S3Target",
    "StagedFile",
    "StagedImage",
    "TransientS3StagingError",
    "client_from_block",
    "gallery_key",
    "get_s3_client",
    "image_key",
    "is_transient_s3_error",
    "manifest_key",
    "normalize_prefix",
    "presign",
    "reset_s3_clients",
    "safe_id",
    "slugify",
    "stage_file",
    "stage_image",
    "stage_image_task",
    "stage_manifest_task",
    "target_from_bucket_block",
]

MiB = 1024 * 1024
#: S3's SigV4 limit for presigned URLs: 7 days.
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600
#: S3 refuses multipart parts smaller than 5 MiB (except the last one).
MIN_PART_SIZE = 5 * MiB
MANIFEST_CONTENT_TYPE = "application/x-ndjson"
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "webp": "webp"}
PROMPT_SLUG_MAX = 48
_ID_MAX = 64

_log = logging.getLogger(__name__)


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run logger inside a flow/task run (so lines reach the UI), else a plain one."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return _log


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class S3StagingError(GptImageError):
    """Staging to S3 failed. ``transient`` says whether a retry may help.

    Attributes:
        bucket, key: the object concerned.
        code: S3's error code (``NoSuchBucket``, ``SlowDown``, ...) or the botocore exception name.
        status_code: the HTTP status, when S3 answered.
    """

    def __init__(
        self,
        message: str,
        *,
        bucket: str,
        key: str,
        code: str | None = None,
        status_code: int | None = None,
        transient: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.bucket = bucket
        self.key = key
        self.code = code
        self.status_code = status_code
        if transient is not None:
            self.transient = transient

    @classmethod
    def from_exception(
        cls, exc: BaseException, *, bucket: str, key: str, operation: str
    ) -> S3StagingError:
        """Wrap a boto3/botocore failure in the right subclass, with a credential-free message.

        Example:
            >>> err = S3StagingError.from_exception(
            ...     EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/k"),
            ...     bucket="b", key="k", operation="upload")
            >>> (type(err).__name__, err.transient)
            ('TransientS3StagingError', True)
        """
        transient = is_transient_s3_error(exc)
        code, status, detail = _describe(exc)
        where = f"s3://{bucket}/{key}" if key else f"bucket {bucket!r}"
        status_txt = f" (HTTP {status})" if status else ""
        message = _redact(f"S3 {operation} of {where} failed: {code}{status_txt}: {detail}")
        kind: type[S3StagingError] = (
            TransientS3StagingError if transient else PermanentS3StagingError
        )
        return kind(message, bucket=bucket, key=key, code=code, status_code=status)


class TransientS3StagingError(S3StagingError):
    """Throttling, 5xx, timeouts, dropped connections: worth retrying."""

    transient = True


class PermanentS3StagingError(S3StagingError):
    """Missing bucket, access denied, bad credentials, bad local file: retrying cannot help."""

    transient = False


_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "ProvisionedThroughputExceededException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
        "IDPCommunicationError",
    }
)
_TRANSIENT_BOTO = (
    EndpointConnectionError,
    ConnectTimeoutError,
    ProxyConnectionError,
    ReadTimeoutError,
    ConnectionClosedError,
    ResponseStreamingError,
    IncompleteReadError,
    ChecksumError,
)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` followed by its causes/contexts (boto3 wraps ClientError in S3UploadFailedError)."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 8:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def is_transient_s3_error(exc: BaseException) -> bool:
    """True when retrying the S3 call that raised ``exc`` may succeed.

    Transient: throttling (``SlowDown``, ``Throttling``, HTTP 429/503), other 5xx and
    ``InternalError``, ``RequestTimeout`` (408), connection failures (``EndpointConnectionError``,
    connect/read timeouts, closed connections) and truncated or corrupted bodies. Permanent: every
    other 4xx (``AccessDenied``, ``NoSuchBucket``, ``InvalidAccessKeyId``, ...), missing
    credentials, invalid parameters, TLS verification failures, local file errors.

    Example:
        >>> is_transient_s3_error(ClientError({"Error": {"Code": "SlowDown"}}, "PutObject"))
        True
        >>> is_transient_s3_error(ClientError({"Error": {"Code": "NoSuchBucket"},
        ...     "ResponseMetadata": {"HTTPStatusCode": 404}}, "PutObject"))
        False
    """
    for item in _chain(exc):
        if isinstance(item, S3StagingError):
            return item.transient
        if isinstance(item, ClientError):
            code = str(item.response.get("Error", {}).get("Code", ""))
            status = item.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _TRANSIENT_CODES:
                return True
            if code.isdigit() and status is None:
                status = int(code)
            if isinstance(status, int):
                return status >= 500 or status in (408, 429)
            return False
        if isinstance(item, SSLError):
            return False  # certificate problems do not fix themselves
        if isinstance(item, _TRANSIENT_BOTO):
            return True
        if isinstance(item, HTTPClientError):
            return True
        if isinstance(item, BotoCoreError):
            return False  # credentials, validation, configuration
        if isinstance(item, (ConnectionError, TimeoutError)):
            return True
    return False


def _describe(exc: BaseException) -> tuple[str, int | None, str]:
    """(error code, HTTP status, short detail) for the first informative exception in the chain."""
    for item in _chain(exc):
        if isinstance(item, ClientError):
            err = item.response.get("Error", {})
            code = str(err.get("Code") or "ClientError")
            status = item.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            detail = str(err.get("Message") or item)
            return code, status if isinstance(status, int) else None, detail[:300]
    return type(exc).__name__, None, str(exc)[:300]


_SECRET_PATTERNS = (
    re.compile(r"(AKIA|ASIA)[A-Z0-9]{16}"),
    re.compile(r"(X-Amz-(Signature|Credential|Security-Token)=)[^&\s]+", re.IGNORECASE),
    re.compile(r"((Signature|AWSAccessKeyId|x-amz-security-token)=)[^&\s]+", re.IGNORECASE),
)


def _redact(text: str) -> str:
    """Strip anything that looks like an access key or a presigning signature from a message."""
    text = _SECRET_PATTERNS[0].sub("<redacted-key-id>", text)
    for pattern in _SECRET_PATTERNS[1:]:
        text = pattern.sub(r"\1<redacted>", text)
    return text


# --------------------------------------------------------------------------------------------
# Key layout
# --------------------------------------------------------------------------------------------


def slugify(text: str, max_len: int = PROMPT_SLUG_MAX, *, default: str = "image") -> str:
    """Lowercase ASCII ``[a-z0-9-]`` slug of ``text``, at most ``max_len`` chars, never empty.

    Accents are folded (``é`` -> ``e``); everything else that is not a letter or digit becomes a
    dash; runs of dashes collapse; leading/trailing dashes go.

    Example:
        >>> slugify("../../etc/passwd")
        'etc-passwd'
        >>> slugify("Crème brûlée, 4K!")
        'creme-brulee-4k'
        >>> slugify("日本語")
        'image'
    """
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")
    slug = slug[:max_len].rstrip("-")
    return slug or default


def _short_hash(value: str, n: int = 10) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def safe_id(value: str, max_len: int = _ID_MAX, *, default: str = "unknown") -> str:
    """A key segment made from an identifier (request id, run key): ``[A-Za-z0-9_-]`` only.

    Identifiers that are already safe pass unchanged; anything that had to be altered or
    truncated gets ``-`` plus 10 hex digits of the raw value's SHA-256, so distinct inputs stay
    distinct.

    Example:
        >>> safe_id("764cabcf-b745-4b3e-ae38-1200304cf45b")
        '764cabcf-b745-4b3e-ae38-1200304cf45b'
        >>> safe_id("../x").startswith("x-")
        True
    """
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", value).strip("-_")
    if cleaned == value and 0 < len(value) <= max_len:
        return value
    cleaned = cleaned[: max(1, max_len - 11)].strip("-_")
    return f"{cleaned or default}-{_short_hash(value)}"


def normalize_prefix(prefix: str) -> str:
    """Normalize a key prefix: safe segments joined by ``/``, no leading/trailing ``/``, no ``..``.

    Example:
        >>> normalize_prefix("/team a//../gptimage/")
        'team-a/gptimage'
    """
    segments = []
    for raw in prefix.replace("\\", "/").split("/"):
        seg = re.sub(r"[^A-Za-z0-9._-]+", "-", raw.strip()).strip("-")
        if seg in ("", ".", ".."):
            continue
        segments.append(seg[:64])
    return "/".join(segments)[:256].strip("/")


def _join(prefix: str, *parts: str) -> str:
    head = normalize_prefix(prefix)
    return "/".join([head, *parts]) if head else "/".join(parts)


def _prefix_of(target_or_prefix: S3Target | str) -> str:
    return target_or_prefix.prefix if isinstance(target_or_prefix, S3Target) else target_or_prefix


def image_key(
    target_or_prefix: S3Target | str,
    *,
    endpoint: str,
    request_id: str,
    index: int,
    prompt: str,
    fmt: str,
) -> str:
    """The object key of one image (layout in the module docstring).

    Example:
        >>> image_key("p", endpoint="fal-ai/gpt-image-1.5/edit", request_id="r1", index=3,
        ...           prompt="", fmt="jpeg")
        'p/fal-ai-gpt-image-1-5-edit/r1/03-image.jpg'
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    ext = _EXTENSIONS.get(fmt.lower().lstrip("."))
    if ext is None:
        raise ValueError(f"unsupported image format {fmt!r}; expected one of png, jpeg, webp")
    return _join(
        _prefix_of(target_or_prefix),
        slugify(endpoint, 96, default="unknown-endpoint"),
        safe_id(request_id),
        f"{index:02d}-{slugify(prompt)}.{ext}",
    )


def manifest_key(target_or_prefix: S3Target | str, run_key: str) -> str:
    """``{prefix}/manifests/{run_key}.jsonl`` with ``run_key`` sanitized.

    Example:
        >>> manifest_key("gptimage", "nightly-2026-11-24")
        'gptimage/manifests/nightly-2026-11-24.jsonl'
    """
    return _join(_prefix_of(target_or_prefix), "manifests", f"{safe_id(run_key, 128)}.jsonl")


def gallery_key(target_or_prefix: S3Target | str, run_key: str) -> str:
    """``{prefix}/manifests/{run_key}.html``: where an HTML gallery of a run is staged."""
    return _join(_prefix_of(target_or_prefix), "manifests", f"{safe_id(run_key, 128)}.html")


def _check_key(key: str) -> str:
    """Refuse keys that could escape a prefix or confuse tools (used for caller-made keys)."""
    if (
        not key
        or key.startswith("/")
        or len(key.encode("utf-8")) > 1024
        or any(part in ("", ".", "..") for part in key.split("/"))
        or re.search(r"[^A-Za-z0-9._/-]", key)
    ):
        raise ValueError(
            f"unsafe S3 key {key!r}: use [A-Za-z0-9._-] segments joined by '/', "
            "no empty, '.' or '..' segment, no leading '/' (see manifest_key/gallery_key)"
        )
    return key


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class S3Target(BaseModel):
    """Where and how images are staged.

    Example:
        >>> S3Target(bucket="my-images", prefix="/team//gpt/").prefix
        'team/gpt'
        >>> S3Target(bucket="my-images", presign_expires=0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pydantic_core._pydantic_core.ValidationError: 1 validation error for S3Target...
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket: str = Field(min_length=3, max_length=255, description="Bucket name (or access point).")
    prefix: str = Field(default="gptimage", description="Key prefix; normalized.")
    presign_expires: int = Field(
        default=24 * 3600,
        description="Lifetime of presigned GET links, seconds (1 .. 604800 = 7 days).",
    )
    multipart_threshold: int = Field(
        default=8 * MiB, description="Bodies at least this large are uploaded in parts."
    )
    multipart_chunksize: int = Field(default=8 * MiB, description="Part size of multipart uploads.")
    max_concurrency: int = Field(
        default=4, ge=1, le=64, description="Threads per multipart upload (per image)."
    )

    @field_validator("bucket")
    @classmethod
    def _bucket_ok(cls, value: str) -> str:
        is_arn = value.startswith("arn:")  # access point / outpost ARNs contain "/"
        if ("/" in value and not is_arn) or value != value.strip() or not value.isascii():
            raise ValueError(f"bucket must be a bare bucket name or an ARN, got {value!r}")
        return value

    @field_validator("prefix")
    @classmethod
    def _normalize(cls, value: str) -> str:
        return normalize_prefix(value)

    @field_validator("presign_expires")
    @classmethod
    def _expires_ok(cls, value: int) -> int:
        return _validate_expires(value)

    @field_validator("multipart_threshold", "multipart_chunksize")
    @classmethod
    def _part_ok(cls, value: int) -> int:
        if value < MIN_PART_SIZE:
            raise ValueError(f"must be at least 5 MiB ({MIN_PART_SIZE} bytes; S3's minimum part)")
        return value

    def transfer_config(self) -> TransferConfig:
        """The boto3 managed-transfer settings for this target."""
        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
            use_threads=True,
        )


def _validate_expires(value: int) -> int:
    if not 1 <= value <= MAX_PRESIGN_EXPIRES:
        raise ValueError(
            f"presign_expires must be between 1 and {MAX_PRESIGN_EXPIRES} seconds "
            f"(7 days, the SigV4 maximum for presigned URLs); got {value}"
        )
    return value


class StagedFile(BaseModel):
    """A file (manifest, gallery) stored in S3."""

    bucket: str
    key: str
    s3_uri: str
    url: str = Field(description="Presigned GET URL.")
    url_expires_at: dt.datetime
    content_type: str
    bytes: int


class StagedImage(BaseModel):
    """An image stored in S3: serializable, safe to persist (the URL is time limited).

    ``uploaded`` is False when an identical object (same SHA-256) was already there.
    """

    bucket: str
    key: str
    s3_uri: str
    url: str = Field(description="Presigned GET URL, valid until url_expires_at.")
    url_expires_at: dt.datetime
    content_type: str
    format: str
    bytes: int
    sha256: str
    width: int
    height: int
    request_id: str
    endpoint: str
    index: int
    uploaded: bool


# --------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------


class _SessionSource(Protocol):
    """prefect-aws ``AwsCredentials`` / ``MinIOCredentials`` (duck typed)."""

    def get_boto3_session(self) -> Any: ...


class _BucketBlock(Protocol):
    """prefect-aws ``S3Bucket`` (duck typed)."""

    bucket_name: str
    credentials: Any


ClientSource = Union["S3Client", _SessionSource, _BucketBlock, None]

_CLIENTS: dict[tuple[Any, ...], tuple[object, S3Client]] = {}
_CLIENTS_LOCK = threading.Lock()
_ENV_KEYS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def _botocore_config(max_attempts: int, max_pool_connections: int) -> Config:
    return Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        max_pool_connections=max_pool_connections,
        signature_version="s3v4",
        connect_timeout=10,
        read_timeout=60,
    )


def get_s3_client(*, max_attempts: int = 5, max_pool_connections: int = 64) -> S3Client:
    """The process-wide S3 client from boto3's standard configuration chain.

    Built once per distinct configuration (the relevant ``AWS_*`` environment variables,
    ``max_attempts``, ``max_pool_connections``) under a lock and shared by all threads: boto3
    clients are thread-safe, sessions are not. botocore's own ``standard`` retries
    (``max_attempts`` tries in all, with backoff) absorb brief throttling before an error reaches
    the Prefect task's retry policy. ``max_pool_connections`` should cover the task runner's
    threads times ``S3Target.max_concurrency``.

    Example:
        >>> client = get_s3_client()
        >>> client is get_s3_client()
        True
    """
    env = tuple(os.environ.get(name) for name in _ENV_KEYS)
    cache_key = ("env", env, max_attempts, max_pool_connections)
    with _CLIENTS_LOCK:
        hit = _CLIENTS.get(cache_key)
        if hit is None:
            client = boto3.session.Session().client(
                "s3", config=_botocore_config(max_attempts, max_pool_connections)
            )
            hit = (env, client)
            _CLIENTS[cache_key] = hit
        return hit[1]


def client_from_block(
    block: _SessionSource | _BucketBlock, *, max_attempts: int = 5, max_pool_connections: int = 64
) -> S3Client:
    """An S3 client from a prefect-aws ``AwsCredentials``, ``MinIOCredentials`` or ``S3Bucket``.

    prefect-aws is optional and never imported here: the block is used by duck typing
    (``get_boto3_session()`` and ``aws_client_parameters.get_params_override()``). The block's own
    client parameters (endpoint URL, TLS, a botocore config) win over this module's defaults.
    One client is cached per block object.

    Example:
        >>> from prefect_aws import S3Bucket  # doctest: +SKIP
        >>> client = client_from_block(S3Bucket.load("images"))  # doctest: +SKIP
    """
    creds: Any = getattr(block, "credentials", None) or block
    if not hasattr(creds, "get_boto3_session"):
        raise TypeError(
            f"{type(block).__name__} is not a prefect-aws credentials or S3Bucket block"
        )
    cache_key = ("block", id(creds), max_attempts, max_pool_connections)
    with _CLIENTS_LOCK:
        hit = _CLIENTS.get(cache_key)
        if hit is None or hit[0] is not creds:
            params: dict[str, Any] = {}
            client_params = getattr(creds, "aws_client_parameters", None)
            if client_params is not None and hasattr(client_params, "get_params_override"):
                params = dict(client_params.get_params_override())
            config = _botocore_config(max_attempts, max_pool_connections)
            theirs = params.pop("config", None)
            if isinstance(theirs, Config):
                config = config.merge(theirs)
            client = creds.get_boto3_session().client("s3", config=config, **params)
            hit = (creds, client)
            _CLIENTS[cache_key] = hit
        return hit[1]


def reset_s3_clients() -> None:
    """Forget cached clients (tests, or after rotating credentials in-process)."""
    with _CLIENTS_LOCK:
        _CLIENTS.clear()


def _resolve_client(client: ClientSource) -> S3Client:
    if client is None:
        return get_s3_client()
    if hasattr(client, "get_boto3_session") or hasattr(client, "bucket_name"):
        return client_from_block(client)  # type: ignore[arg-type]
    return client  # type: ignore[return-value]


def target_from_bucket_block(
    block: _BucketBlock, *, presign_expires: int = 24 * 3600, prefix: str | None = None
) -> S3Target:
    """An :class:`S3Target` from a prefect-aws ``S3Bucket`` block (bucket name and folder).

    Example:
        >>> target = target_from_bucket_block(S3Bucket.load("images"))  # doctest: +SKIP
    """
    folder = prefix if prefix is not None else (getattr(block, "bucket_folder", "") or "gptimage")
    return S3Target(bucket=block.bucket_name, prefix=folder, presign_expires=presign_expires)


# --------------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------------


def presign(bucket: str, key: str, expires: int, client: ClientSource = None) -> str:
    """A presigned GET URL for ``s3://bucket/key`` valid ``expires`` seconds (1 .. 7 days).

    Signed locally (no network call) with SigV4. Anyone holding the URL can read the object until
    it expires, so treat it like a short-lived password.

    Example:
        >>> url = presign("my-images", "gptimage/x.png", 3600)  # doctest: +SKIP
    """
    _validate_expires(expires)
    return _resolve_client(client).generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
    )


def _expiry(expires: int) -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=expires)


def _ascii(value: object, limit: int = 128) -> str:
    """S3 user metadata must be ASCII (and short): fold, drop control chars, truncate."""
    text = unicodedata.normalize("NFKD", str(value)).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[\x00-\x1f\x7f]", "", text)[:limit]


def _head(s3: S3Client, bucket: str, key: str) -> dict[str, Any] | None:
    """HeadObject, or None when the object is missing (or HEAD is not permitted: then upload)."""
    try:
        return dict(s3.head_object(Bucket=bucket, Key=key))
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchKey", "NotFound") and status != 403:
            return None
        if code in ("403", "AccessDenied", "Forbidden") or status == 403:
            # Write-only credentials: we cannot check, so upload (a missing bucket or real denial
            # will surface from the PUT with a precise code).
            return None
        raise S3StagingError.from_exception(exc, bucket=bucket, key=key, operation="HEAD") from exc
    except Exception as exc:
        raise S3StagingError.from_exception(exc, bucket=bucket, key=key, operation="HEAD") from exc


def stage_image(
    image: DownloadedImage,
    *,
    prompt: str,
    request: dict[str, Any],
    target: S3Target,
    client: ClientSource = None,
) -> StagedImage:
    """Upload one verified image to S3 (private, streamed) and return where it is.

    The key follows the module's layout. The object gets ``ContentType`` from the image and ASCII
    metadata: ``request-id``, ``endpoint``, ``index``, ``prompt-sha256``, ``sha256``, ``quality``,
    ``image-size``, ``format``, ``width``, ``height`` (never the prompt itself). Idempotent: when
    the key already holds an object whose ``sha256`` metadata matches, nothing is uploaded and
    ``uploaded`` is False, so a re-run writes no duplicate. No ACL is set: objects stay private
    and are shared through the presigned ``url``.

    Raises:
        TransientS3StagingError: throttling, 5xx, connection trouble (retry).
        PermanentS3StagingError: missing bucket, access denied, local file changed, ...

    Example:
        >>> staged = stage_image(img, prompt="a lighthouse", request=req.to_arguments(),
        ...                      target=S3Target(bucket="my-images"))  # doctest: +SKIP
        >>> staged.s3_uri  # doctest: +SKIP
        's3://my-images/gptimage/fal-ai-gpt-image-1-5/<request id>/00-a-lighthouse.png'
    """
    key = image_key(
        target,
        endpoint=image.endpoint,
        request_id=image.request_id,
        index=image.index,
        prompt=prompt,
        fmt=image.format,
    )
    bucket = target.bucket
    try:
        size = os.stat(image.path).st_size
    except OSError as exc:
        raise PermanentS3StagingError(
            f"cannot stage s3://{bucket}/{key}: local file {image.path!r} unreadable ({exc})",
            bucket=bucket,
            key=key,
            code=type(exc).__name__,
        ) from exc
    if size != image.bytes:
        raise PermanentS3StagingError(
            f"cannot stage s3://{bucket}/{key}: {image.path!r} has {size} bytes, "
            f"the verified image had {image.bytes}",
            bucket=bucket,
            key=key,
            code="LocalFileChanged",
        )

    s3 = _resolve_client(client)
    head = _head(s3, bucket, key)
    existing_sha = (head or {}).get("Metadata", {}).get("sha256")
    if head is not None and existing_sha == image.sha256 and head.get("ContentLength") == size:
        uploaded = False
        _logger().info("s3://%s/%s already holds this image (sha256 match); skipped", bucket, key)
    else:
        if head is not None:
            _logger().warning("s3://%s/%s holds different bytes; overwriting", bucket, key)
        metadata = {
            "request-id": _ascii(image.request_id),
            "endpoint": _ascii(image.endpoint),
            "index": str(image.index),
            "prompt-sha256": hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest(),
            "sha256": _ascii(image.sha256, 64),
            "quality": _ascii(request.get("quality", "high"), 16),
            "image-size": _ascii(
                request.get("image_size", "auto" if request.get("image_urls") else "1024x1024"),
                16,
            ),
            "format": _ascii(image.format, 8),
            "width": str(int(image.width)),
            "height": str(int(image.height)),
        }
        try:
            s3.upload_file(
                image.path,
                bucket,
                key,
                ExtraArgs={"ContentType": image.content_type, "Metadata": metadata},
                Config=target.transfer_config(),
            )
        except Exception as exc:
            raise S3StagingError.from_exception(
                exc, bucket=bucket, key=key, operation="upload"
            ) from exc
        uploaded = True

    return StagedImage(
        bucket=bucket,
        key=key,
        s3_uri=f"s3://{bucket}/{key}",
        url=presign(bucket, key, target.presign_expires, s3),
        url_expires_at=_expiry(target.presign_expires),
        content_type=image.content_type,
        format=image.format,
        bytes=image.bytes,
        sha256=image.sha256,
        width=image.width,
        height=image.height,
        request_id=image.request_id,
        endpoint=image.endpoint,
        index=image.index,
        uploaded=uploaded,
    )


def stage_file(
    path: str | os.PathLike[str],
    key: str,
    content_type: str,
    target: S3Target,
    client: ClientSource = None,
) -> StagedFile:
    """Upload a local file (a manifest, an HTML gallery) to ``s3://{target.bucket}/{key}``.

    ``key`` is a full object key and must be safe (``[A-Za-z0-9._-]`` segments; build it with
    :func:`manifest_key` or :func:`gallery_key`). Always uploads (overwrites), streamed.

    Example:
        >>> stage_file("run.jsonl", manifest_key(target, "nightly"), MANIFEST_CONTENT_TYPE,
        ...            target)  # doctest: +SKIP
    """
    _check_key(key)
    bucket = target.bucket
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise PermanentS3StagingError(
            f"cannot stage s3://{bucket}/{key}: local file {os.fspath(path)!r} unreadable ({exc})",
            bucket=bucket,
            key=key,
            code=type(exc).__name__,
        ) from exc
    s3 = _resolve_client(client)
    try:
        s3.upload_file(
            os.fspath(path),
            bucket,
            key,
            ExtraArgs={"ContentType": content_type},
            Config=target.transfer_config(),
        )
    except Exception as exc:
        raise S3StagingError.from_exception(
            exc, bucket=bucket, key=key, operation="upload"
        ) from exc
    return StagedFile(
        bucket=bucket,
        key=key,
        s3_uri=f"s3://{bucket}/{key}",
        url=presign(bucket, key, target.presign_expires, s3),
        url_expires_at=_expiry(target.presign_expires),
        content_type=content_type,
        bytes=size,
    )


# --------------------------------------------------------------------------------------------
# Prefect tasks
# --------------------------------------------------------------------------------------------


@task(
    name="stage-image-s3",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=1),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def stage_image_task(
    image: DownloadedImage,
    prompt: str,
    request: dict[str, Any],
    target: S3Target,
    client: ClientSource = None,
) -> StagedImage:
    """Prefect task around :func:`stage_image`: 3 retries (1, 2, 4 s, jittered), transient only.

    Example:
        >>> @flow  # doctest: +SKIP
        ... def publish(images, prompt, request):
        ...     target = S3Target(bucket="my-images")
        ...     return [stage_image_task(i, prompt, request, target) for i in images]
    """
    return stage_image(image, prompt=prompt, request=request, target=target, client=client)


@task(
    name="stage-manifest-s3",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=1),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def stage_manifest_task(
    path: str,
    run_key: str,
    target: S3Target,
    client: ClientSource = None,
) -> StagedFile:
    """Prefect task: upload a JSONL manifest to ``{prefix}/manifests/{run_key}.jsonl``.

    Example:
        >>> staged = stage_manifest_task("out/run.jsonl", "nightly-1", target)  # doctest: +SKIP
        >>> staged.s3_uri  # doctest: +SKIP
        's3://my-images/gptimage/manifests/nightly-1.jsonl'
    """
    return stage_file(
        Path(path), manifest_key(target, run_key), MANIFEST_CONTENT_TYPE, target, client
    )
