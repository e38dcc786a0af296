"""Before paying: can the images land? A valid bucket name, and a bucket that takes a write.

A run pays fal for every image before it stages the first one, so a missing bucket, a denied
write or a bad key found at staging time means images paid for and lost. The flows call
:func:`check_target` before their first submit:

* :func:`validate_bucket_name`: S3's naming rules, locally (``Bad_Bucket!`` never reaches the
  network). Access point and Outpost ARNs are passed through.
* :func:`probe_bucket`: one tiny ``PutObject`` of :data:`PROBE_NAME` under the run's prefix,
  then a ``DeleteObject`` of it. That is the permission staging needs and nothing more: a
  write-only credential passes (``HeadBucket`` would need ``s3:ListBucket``), and a missing
  bucket (``NoSuchBucket``), a denied write (``AccessDenied``) or a bad key
  (``InvalidAccessKeyId``, ``SignatureDoesNotMatch``) fail here, as a
  :class:`~prefect_gptimage.errors.PermanentS3StagingError`. An unreachable endpoint is retried
  like any S3 call (the package's retry budget, ``PREFECT_GPTIMAGE_RETRY_BUDGET``), then fails
  as a :class:`~prefect_gptimage.errors.TransientS3StagingError`. The
  probe key is always the same, so at most one 0-byte object is ever left behind (when the
  credential may not delete); on a versioned bucket each run adds a delete marker.

Example:
    >>> validate_bucket_name("Bad_Bucket!")
    Traceback (most recent call last):
    ...
    prefect_gptimage.errors.InvalidRequestError: bucket: 'Bad_Bucket!' is not a valid S3 bucket ...
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any

from botocore.exceptions import ClientError

from prefect_gptimage.errors import InvalidRequestError
from prefect_gptimage.retry import RetryPolicy
from prefect_gptimage.s3.clients import ClientSource, resolve_client
from prefect_gptimage.s3.failures import s3_error
from prefect_gptimage.s3.models import S3Target
from prefect_gptimage.s3.staging import policy_or_default

__all__ = ["PROBE_NAME", "check_target", "probe_bucket", "validate_bucket_name"]

#: The object the probe writes (and deletes) under the run's prefix.
PROBE_NAME = ".gptimage-preflight"

_log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--table-s3")
_ARN = re.compile(r"^arn:aws[a-z-]*:s3(-outposts|-object-lambda)?:[a-z0-9-]*:\d{12}:.+$")


def validate_bucket_name(name: str) -> str:
    """``name`` if it follows S3's bucket naming rules (or is an S3 access point ARN).

    3 to 63 characters: lowercase letters, digits, dots and hyphens, starting and ending with a
    letter or digit, no ``..``, not an IP address, none of S3's reserved prefixes and suffixes.
    Raises :class:`InvalidRequestError` (field ``bucket``) with the rule it breaks.
    """
    if not isinstance(name, str):
        raise InvalidRequestError("bucket", f"must be a bucket name, got {type(name).__name__}")
    if name.startswith("arn:"):
        if _ARN.match(name):
            return name
        raise InvalidRequestError("bucket", f"{name!r} is not a valid S3 access point ARN")
    problem = _name_problem(name)
    if problem:
        raise InvalidRequestError("bucket", f"{name!r} is not a valid S3 bucket name: {problem}")
    return name


def _name_problem(name: str) -> str | None:
    if not 3 <= len(name) <= 63:
        return f"it must be 3 to 63 characters long (it has {len(name)})"
    if not _NAME.match(name):
        return (
            "use only lowercase letters, digits, dots and hyphens, "
            "and start and end with a letter or digit"
        )
    if ".." in name or ".-" in name or "-." in name:
        return "dots may not be doubled or next to a hyphen"
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        pass
    else:
        return "it may not look like an IP address"
    if name.startswith(_RESERVED_PREFIXES) or name.endswith(_RESERVED_SUFFIXES):
        return "it uses a prefix or suffix S3 reserves"
    return None


def probe_key(target: S3Target) -> str:
    """The probe's key: :data:`PROBE_NAME` under the target's prefix."""
    return f"{target.prefix}/{PROBE_NAME}" if target.prefix else PROBE_NAME


def probe_bucket(
    target: S3Target, client: ClientSource = None, retry: RetryPolicy | None = None
) -> None:
    """Prove the bucket exists and takes a write: put a 0-byte probe, then delete it.

    Raises :class:`~prefect_gptimage.errors.S3StagingError` (permanent for a missing bucket, a
    denied write or bad credentials; transient for an endpoint still unreachable when the
    ``retry`` budget ran out, default :meth:`RetryPolicy.from_settings`) naming the bucket.
    A denied *delete* is not an error: staging never deletes.
    """
    s3: Any = resolve_client(client)
    key = probe_key(target)
    for attempt in policy_or_default(retry).retrying():
        with attempt:
            _probe_write(s3, target.bucket, key)
    try:
        s3.delete_object(Bucket=target.bucket, Key=key)
    except ClientError as exc:  # e.g. a write-only credential: leave the 0-byte probe
        _log.debug("could not delete the preflight probe s3://%s/%s: %s", target.bucket, key, exc)


def _probe_write(s3: Any, bucket: str, key: str) -> None:
    try:
        s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=b"",
            ContentType="text/plain",
            Metadata={"purpose": "prefect-gptimage preflight: the bucket takes a write"},
        )
    except Exception as exc:
        raise s3_error(exc, bucket=bucket, key=key, operation="preflight write") from exc


def check_target(
    target: S3Target | None, client: ClientSource = None, *, probe: bool = True
) -> None:
    """All S3 checks before a run pays: the name (locally), then, with ``probe``, a write."""
    if target is None:
        return
    validate_bucket_name(target.bucket)
    if probe:
        probe_bucket(target, client)
