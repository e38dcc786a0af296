"""Reading an input image's bytes once, from where the user named it.

A local path is read from disk, an ``s3://bucket/key`` object with the user's own boto3 chain
(:func:`~prefect_gptimage.s3.clients.get_s3_client`, transient S3 failures retried within the
package's retry budget), a ``data:`` URI decoded. Every failure is one
:class:`~prefect_gptimage.errors.InputImageError` naming the input: a missing or unreadable
file, a missing object or bucket, access denied, more than ``limit`` bytes.

``http(s)`` URLs are not read here: fal fetches them itself (see :mod:`prefect_gptimage.inputs`).
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from prefect_gptimage.errors import InputImageError, S3StagingError
from prefect_gptimage.retry import RetryPolicy
from prefect_gptimage.s3.failures import s3_error
from prefect_gptimage.schemas import input_kind, split_s3_uri

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["read_input"]

_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_DENIED_CODES = {"403", "AccessDenied", "Forbidden", "AllAccessDisabled"}


def _too_large(field: str, ref: str, size: int, limit: int) -> InputImageError:
    return InputImageError(
        field, ref, f"{size} bytes, more than the {limit} bytes an edit input may have"
    )


def read_local(field: str, path: str, limit: int) -> bytes:
    """The bytes of a local file (at most ``limit``)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise InputImageError(field, path, "no such file") from None
    except IsADirectoryError:
        raise InputImageError(field, path, "is a folder, not an image file") from None
    except PermissionError:
        raise InputImageError(field, path, "permission denied: cannot read it") from None
    except OSError as exc:
        raise InputImageError(field, path, f"cannot read it ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise _too_large(field, path, len(data), limit)
    return data


def read_s3(field: str, uri: str, limit: int, client: S3Client) -> bytes:
    """The bytes of ``s3://bucket/key`` read with ``client`` (at most ``limit``)."""
    bucket, key = split_s3_uri(uri)
    for attempt in RetryPolicy.from_settings().retrying():
        with attempt:
            try:
                answer = client.get_object(Bucket=bucket, Key=key)
                size = int(answer.get("ContentLength") or 0)
                if size > limit:
                    answer["Body"].close()
                    raise _too_large(field, uri, size, limit)
                data: bytes = answer["Body"].read(limit + 1)
            except InputImageError:
                raise
            except Exception as exc:
                error = s3_error(exc, bucket=bucket, key=key, operation="GET")
                if error.transient:
                    raise error from exc
                raise _s3_reason(field, uri, error) from None
    if len(data) > limit:
        raise _too_large(field, uri, len(data), limit)
    return data


def _s3_reason(field: str, uri: str, error: S3StagingError) -> InputImageError:
    code = str(getattr(error, "code", "") or "")
    if code == "NoSuchBucket":
        return InputImageError(field, uri, "no such bucket")
    if code in _MISSING_CODES:
        return InputImageError(field, uri, "no such S3 object")
    if code in _DENIED_CODES or getattr(error, "status_code", None) == 403:
        return InputImageError(field, uri, "access denied (with your AWS credentials)")
    return InputImageError(field, uri, f"cannot read it: {error}")


def read_data_uri(field: str, uri: str, limit: int) -> bytes:
    """The bytes of a ``data:`` URI (base64 or percent-encoded)."""
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise InputImageError(field, uri[:40], "malformed data: URI (no ',')")
    try:
        if header.lower().endswith(";base64"):
            data = base64.b64decode(payload, validate=True)
        else:
            data = unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise InputImageError(field, uri[:40], f"malformed data: URI ({exc})") from None
    if len(data) > limit:
        raise _too_large(field, uri[:40], len(data), limit)
    return data


def read_input(field: str, ref: str, limit: int, s3_client: S3Client | None = None) -> bytes:
    """The bytes of a local path, an ``s3://`` object or a ``data:`` URI (see the module docs).

    ``s3_client``: how to read ``s3://`` inputs (None: the user's boto3 chain).
    """
    kind = input_kind(ref)
    if kind == "local":
        return read_local(field, ref.strip(), limit)
    if kind == "s3":
        if s3_client is None:
            from prefect_gptimage.s3.clients import get_s3_client

            s3_client = get_s3_client()
        return read_s3(field, ref.strip(), limit, s3_client)
    if kind == "data":
        return read_data_uri(field, ref.strip(), limit)
    raise InputImageError(field, ref, "fal fetches this input itself: it is not read here")
