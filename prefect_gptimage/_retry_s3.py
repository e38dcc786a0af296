"""The S3 rows of :mod:`prefect_gptimage.retry`'s table: which S3 failures are transient.

Private, split out of :mod:`prefect_gptimage.retry` (which re-exports it) only to keep files
short: the decision is still the retry table's. S3 calls retry under the same
:class:`~prefect_gptimage.retry.RetryPolicy` and budget (``PREFECT_GPTIMAGE_RETRY_BUDGET``) as
fal's; botocore's own retries are off (see :mod:`prefect_gptimage.s3.clients`).
"""

from __future__ import annotations

from prefect_gptimage.errors import S3StagingError

__all__ = ["S3_TRANSIENT_CODES", "exception_chain", "is_transient_s3_error"]

#: S3 error codes worth retrying whatever their HTTP status (throttling, S3's own 5xx codes).
S3_TRANSIENT_CODES = frozenset(
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


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` followed by its causes/contexts (boto3 wraps ClientError in S3UploadFailedError)."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 8:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def is_transient_s3_error(exc: BaseException) -> bool:
    """True when retrying the S3 call that raised ``exc`` may succeed (see the table above).

    Example:
        >>> from botocore.exceptions import ClientError
        >>> is_transient_s3_error(ClientError({"Error": {"Code": "SlowDown"}}, "PutObject"))
        True
        >>> is_transient_s3_error(ClientError({"Error": {"Code": "NoSuchBucket"},
        ...     "ResponseMetadata": {"HTTPStatusCode": 404}}, "PutObject"))
        False
    """
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

    transient_boto = (
        EndpointConnectionError,
        ConnectTimeoutError,
        ProxyConnectionError,
        ReadTimeoutError,
        ConnectionClosedError,
        ResponseStreamingError,
        IncompleteReadError,
        ChecksumError,
        HTTPClientError,
    )
    for item in exception_chain(exc):
        if isinstance(item, S3StagingError):
            return item.transient
        if isinstance(item, ClientError):
            code = str(item.response.get("Error", {}).get("Code", ""))
            status = item.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in S3_TRANSIENT_CODES:
                return True
            if code.isdigit() and status is None:
                status = int(code)
            if isinstance(status, int):
                return status >= 500 or status in (408, 429)
            return False
        if isinstance(item, SSLError):
            return False  # certificate problems do not fix themselves
        if isinstance(item, transient_boto):
            return True
        if isinstance(item, BotoCoreError):
            return False  # credentials, validation, configuration
        if isinstance(item, ConnectionError | TimeoutError):
            return True
    return False
