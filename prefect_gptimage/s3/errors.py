"""S3 staging errors: the transient/permanent split that drives retries, and redaction.

Every boto3/botocore failure met while staging is wrapped in :class:`TransientS3StagingError`
(throttling, 5xx, timeouts, dropped connections: the Prefect task retries) or
:class:`PermanentS3StagingError` (missing bucket, access denied, bad credentials: it fails at once).
Messages are built here, from S3's code and status, with access key ids and presigning signatures
redacted, so no credential reaches a log, a Prefect state or an artifact.
"""

from __future__ import annotations

import re

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

from prefect_gptimage.errors import GptImageError

__all__ = [
    "PermanentS3StagingError",
    "S3StagingError",
    "TransientS3StagingError",
    "is_transient_s3_error",
]


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
