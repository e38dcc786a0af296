"""Stage verified images (and run manifests) in S3, privately, idempotently, with presigned links.

The operations of the :mod:`prefect_gptimage.s3` package: plain functions that do the work (the
Prefect tasks in :mod:`prefect_gptimage.s3.tasks` are thin wrappers). Each retries its own
transient failures (throttling, 5xx, an unreachable endpoint: the retry table of
:mod:`prefect_gptimage.retry`) under one :class:`~prefect_gptimage.retry.RetryPolicy`, by default
:meth:`~prefect_gptimage.retry.RetryPolicy.from_settings`: the same budget as every fal call
(``PREFECT_GPTIMAGE_RETRY_BUDGET``). That is the only layer: the package's S3 clients make one
HTTP try per call, and the tasks add no Prefect retries. Every attempt is idempotent (a
deterministic key; an image already there with the same SHA-256 is not uploaded again). Uploads go
through boto3's managed transfer (``client.upload_file`` with a
:class:`boto3.s3.transfer.TransferConfig`), which streams from the local file and switches to a
multipart upload above ``S3Target.multipart_threshold``: no image, and no batch, is ever held in
memory whole. Keys follow :mod:`prefect_gptimage.s3.keys`; failures raise the
:class:`~prefect_gptimage.errors.S3StagingError` subclasses, built by
:mod:`prefect_gptimage.s3.failures`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import unicodedata
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from prefect_gptimage._run_context import run_logger
from prefect_gptimage.errors import PermanentS3StagingError
from prefect_gptimage.retry import RetryPolicy
from prefect_gptimage.s3.clients import ClientSource, resolve_client
from prefect_gptimage.s3.failures import s3_error
from prefect_gptimage.s3.keys import check_key, image_key
from prefect_gptimage.s3.models import S3Target, StagedFile, StagedImage, validate_expires
from prefect_gptimage.schemas import AnyRequest, DownloadedImage

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["MANIFEST_CONTENT_TYPE", "object_link", "presign", "stage_file", "stage_image"]

MANIFEST_CONTENT_TYPE = "application/x-ndjson"

_log = logging.getLogger(__name__)


def presign(bucket: str, key: str, expires: int, client: ClientSource = None) -> str:
    """A presigned GET URL for ``s3://bucket/key`` valid ``expires`` seconds (1 .. 7 days).

    Signed locally (no network call) with SigV4. Anyone holding the URL can read the object until
    it expires, so treat it like a short-lived password.

    Example:
        >>> url = presign("my-images", "gptimage/x.png", 3600)  # doctest: +SKIP
    """
    validate_expires(expires)
    return resolve_client(client).generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
    )


def object_link(
    bucket: str, key: str, expires: int, client: ClientSource = None
) -> tuple[str, dt.datetime | None]:
    """The link people are given to ``s3://bucket/key`` and when it expires: with
    ``PREFECT_GPTIMAGE_PUBLIC_BASE_URL`` set, ``<base>/<key>`` (a CDN or public bucket: None,
    it does not expire), else a :func:`presign` ed URL valid ``expires`` seconds."""
    from urllib.parse import quote

    from prefect_gptimage.settings import get_settings

    base = get_settings().public_base_url
    if base:
        return f"{base}/{quote(key, safe='/')}", None
    return presign(bucket, key, expires, client), _expiry(expires)


def policy_or_default(retry: RetryPolicy | None) -> RetryPolicy:
    """``retry``, else the package's policy from the settings (read at each call)."""
    return retry if retry is not None else RetryPolicy.from_settings()


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
        raise s3_error(exc, bucket=bucket, key=key, operation="HEAD") from exc
    except Exception as exc:
        raise s3_error(exc, bucket=bucket, key=key, operation="HEAD") from exc


def _local_size(path: str | os.PathLike[str], bucket: str, key: str) -> int:
    """Size of the local file to stage; a missing or unreadable file is a permanent error."""
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise PermanentS3StagingError(
            f"cannot stage s3://{bucket}/{key}: local file {os.fspath(path)!r} unreadable ({exc})",
            bucket=bucket,
            key=key,
            code=type(exc).__name__,
        ) from exc


def _upload(
    s3: S3Client,
    path: str | os.PathLike[str],
    bucket: str,
    key: str,
    extra_args: dict[str, Any],
    target: S3Target,
) -> None:
    """Managed, streamed (multipart when large) upload; failures become S3StagingErrors.

    A file below the multipart threshold is one PutObject: it is sent from this thread
    (``use_threads=False``), not through a transfer thread pool started for each image."""
    config = target.transfer_config()
    try:
        if os.path.getsize(path) < target.multipart_threshold:
            config.use_threads = False
        s3.upload_file(os.fspath(path), bucket, key, ExtraArgs=extra_args, Config=config)
    except Exception as exc:
        raise s3_error(exc, bucket=bucket, key=key, operation="upload") from exc


def stage_image(
    image: DownloadedImage,
    *,
    prompt: str,
    request: AnyRequest,
    target: S3Target,
    client: ClientSource = None,
    retry: RetryPolicy | None = None,
) -> StagedImage:
    """Upload one verified image to S3 (private, streamed) and return where it is.

    The key follows the module's layout. The object gets ``ContentType`` from the image and ASCII
    metadata: ``request-id``, ``endpoint``, ``index``, ``prompt-sha256``, ``sha256``, ``quality``,
    ``image-size`` (both from ``request``), ``format``, ``width``, ``height`` (never the prompt
    itself). Idempotent: when the key already holds an object whose ``sha256`` metadata matches,
    nothing is uploaded and ``uploaded`` is False, so a re-run writes no duplicate. No ACL is set:
    objects stay private and are shared through the presigned ``url``. Transient failures are
    retried within ``retry`` (default: :meth:`RetryPolicy.from_settings`), HEAD included.

    Raises:
        TransientS3StagingError: throttling, 5xx, connection trouble, still failing when the
            retry budget ran out.
        PermanentS3StagingError: missing bucket, access denied, local file changed, ...

    Example:
        >>> staged = stage_image(img, prompt=req.prompt, request=req,
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
    size = _local_size(image.path, bucket, key)
    if size != image.bytes:
        raise PermanentS3StagingError(
            f"cannot stage s3://{bucket}/{key}: {image.path!r} has {size} bytes, "
            f"the verified image had {image.bytes}",
            bucket=bucket,
            key=key,
            code="LocalFileChanged",
        )

    s3 = resolve_client(client)
    for attempt in policy_or_default(retry).retrying():
        with attempt:
            uploaded = _put_image(s3, image, prompt, request, target, key, size)

    url, expires_at = object_link(bucket, key, target.presign_expires, s3)
    return StagedImage(
        bucket=bucket,
        key=key,
        s3_uri=f"s3://{bucket}/{key}",
        url=url,
        url_expires_at=expires_at,
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


def _put_image(
    s3: S3Client,
    image: DownloadedImage,
    prompt: str,
    request: AnyRequest,
    target: S3Target,
    key: str,
    size: int,
) -> bool:
    """One attempt of :func:`stage_image`: HEAD, then upload unless the same bytes are there.
    Returns whether it uploaded."""
    bucket = target.bucket
    head = _head(s3, bucket, key)
    existing_sha = (head or {}).get("Metadata", {}).get("sha256")
    if head is not None and existing_sha == image.sha256 and head.get("ContentLength") == size:
        uploaded = False
        run_logger(_log).info(
            "s3://%s/%s already holds this image (sha256 match); skipped", bucket, key
        )
    else:
        if head is not None:
            run_logger(_log).warning("s3://%s/%s holds different bytes; overwriting", bucket, key)
        metadata = {
            "request-id": _ascii(image.request_id),
            "endpoint": _ascii(image.endpoint),
            "index": str(image.index),
            "prompt-sha256": hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest(),
            "sha256": _ascii(image.sha256, 64),
            "quality": _ascii(request.quality, 16),
            "image-size": _ascii(request.image_size, 16),
            "format": _ascii(image.format, 8),
            "width": str(int(image.width)),
            "height": str(int(image.height)),
        }
        extra = {"ContentType": image.content_type, "Metadata": metadata}
        _upload(s3, image.path, bucket, key, extra, target)
        uploaded = True
    return uploaded


def stage_file(
    path: str | os.PathLike[str],
    key: str,
    content_type: str,
    target: S3Target,
    client: ClientSource = None,
    retry: RetryPolicy | None = None,
) -> StagedFile:
    """Upload a local file (a manifest, an HTML gallery) to ``s3://{target.bucket}/{key}``.

    ``key`` is a full object key and must be safe (``[A-Za-z0-9._-]`` segments; build it with
    :func:`manifest_key`). Always uploads (overwrites), streamed;
    transient failures are retried within ``retry`` (default: :meth:`RetryPolicy.from_settings`).

    Example:
        >>> stage_file("run.jsonl", manifest_key(target, "nightly"), MANIFEST_CONTENT_TYPE,
        ...            target)  # doctest: +SKIP
    """
    check_key(key)
    bucket = target.bucket
    size = _local_size(path, bucket, key)
    s3 = resolve_client(client)
    for attempt in policy_or_default(retry).retrying():
        with attempt:
            _upload(s3, path, bucket, key, {"ContentType": content_type}, target)
    url, expires_at = object_link(bucket, key, target.presign_expires, s3)
    return StagedFile(
        bucket=bucket,
        key=key,
        s3_uri=f"s3://{bucket}/{key}",
        url=url,
        url_expires_at=expires_at,
        content_type=content_type,
        bytes=size,
    )
