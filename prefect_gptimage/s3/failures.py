"""S3 failures as package errors: the right class from the retry table, with redacted messages.

Every boto3/botocore failure met while staging is wrapped by :func:`s3_error` in
:class:`~prefect_gptimage.errors.TransientS3StagingError` or
:class:`~prefect_gptimage.errors.PermanentS3StagingError`, as
:func:`prefect_gptimage.retry.is_transient_s3_error` decides. Messages are built here, from S3's
code and status, with access key ids and presigning signatures redacted, so no credential reaches
a log, a Prefect state or an artifact. (The exception classes themselves live in
:mod:`prefect_gptimage.errors`, with every other exception of the package.)
"""

from __future__ import annotations

import re

from botocore.exceptions import ClientError

from prefect_gptimage.errors import (
    PermanentS3StagingError,
    S3StagingError,
    TransientS3StagingError,
)
from prefect_gptimage.retry import exception_chain, is_transient_s3_error

__all__ = ["s3_error"]


def s3_error(exc: BaseException, *, bucket: str, key: str, operation: str) -> S3StagingError:
    """Wrap a boto3/botocore failure in the right subclass, with a credential-free message.

    Example:
        >>> from botocore.exceptions import EndpointConnectionError
        >>> err = s3_error(
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
    kind: type[S3StagingError] = TransientS3StagingError if transient else PermanentS3StagingError
    return kind(message, bucket=bucket, key=key, code=code, status_code=status)


def _describe(exc: BaseException) -> tuple[str, int | None, str]:
    """(error code, HTTP status, short detail) for the first informative exception in the chain."""
    for item in exception_chain(exc):
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
