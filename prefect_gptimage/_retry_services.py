"""The Prefect API and Redis rows of :mod:`prefect_gptimage.retry`'s table.

Private, split out of :mod:`prefect_gptimage.retry` (which re-exports it) only to keep files
short, like :mod:`prefect_gptimage._retry_s3`: the decision is still the retry table's. The
calls they classify (a global concurrency slot on the Prefect server, the Redis submit lock)
retry under the same :class:`~prefect_gptimage.retry.RetryPolicy` and budget as fal's.
"""

from __future__ import annotations

import httpx

from prefect_gptimage._retry_s3 import exception_chain

__all__ = [
    "PREFECT_API_TRANSIENT_CODES",
    "is_transient_prefect_api_error",
    "is_transient_redis_error",
]

#: Prefect API statuses worth retrying (besides every 5xx): the server busy or restarting.
PREFECT_API_TRANSIENT_CODES = frozenset({408, 425, 429})


def is_transient_prefect_api_error(exc: BaseException) -> bool:
    """Whether a failed Prefect API call (taking or giving back a concurrency slot) may succeed
    if retried: the server restarting (connection refused or reset), a timeout, HTTP
    408/425/429 or any 5xx, found anywhere in ``exc``'s chain (Prefect wraps them, e.g. in
    ``ConcurrencySlotAcquisitionError``). A 4xx (a limit that does not exist, a lease the server
    does not know) and a URL with no ``http(s)://`` are permanent.

    Example:
        >>> is_transient_prefect_api_error(httpx.ConnectError("refused"))
        True
        >>> is_transient_prefect_api_error(RuntimeError("limit must be created first"))
        False
    """
    for cause in exception_chain(exc):
        if isinstance(cause, httpx.HTTPStatusError):
            status = cause.response.status_code
            return status in PREFECT_API_TRANSIENT_CODES or status >= 500
        if isinstance(cause, httpx.UnsupportedProtocol):
            return False
        if isinstance(cause, httpx.TransportError):
            return True
    return False


def is_transient_redis_error(exc: BaseException) -> bool:
    """Whether a failed call to the Redis lock service may succeed if retried: the server
    restarting or unreachable (connection refused, reset or closed), a timeout, ``LOADING`` (a
    restarted server still reading its data) or ``READONLY`` (a Sentinel failover under way),
    found anywhere in ``exc``'s chain. A wrong password or ACL, and every other Redis error (a
    lock no longer held, a bad command), are permanent: waiting would not change them.

    Example:
        >>> from redis.exceptions import AuthenticationError, ConnectionError
        >>> is_transient_redis_error(ConnectionError("Error 111 connecting to 127.0.0.1:6379"))
        True
        >>> is_transient_redis_error(AuthenticationError("invalid username-password pair"))
        False
    """
    try:
        from redis import exceptions as redis_errors  # the optional [redis] extra
    except ImportError:  # pragma: no cover - depends on the install
        return False
    permanent = (
        redis_errors.AuthenticationError,
        redis_errors.AuthorizationError,
        redis_errors.AuthenticationWrongNumberOfArgsError,
    )
    transient = (
        redis_errors.ConnectionError,  # refused, reset, closed; LOADING is one too
        redis_errors.TimeoutError,
        redis_errors.ReadOnlyError,
        ConnectionError,  # the socket's own, where redis-py does not wrap it
        TimeoutError,
    )
    for cause in exception_chain(exc):
        if isinstance(cause, permanent):
            return False
        if isinstance(cause, transient):
            return True
    return False
