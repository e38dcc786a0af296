"""Whatever fal_client or httpx raised, as the package's error (verdicts: :mod:`..retry`).

Most failures already arrive as package errors from :mod:`prefect_gptimage.fal._transport`; what
remains is fal_client's own exceptions (missing credentials, an answer it could not parse).
Messages carry fal's own ``detail`` text; never a header value, so never the key.
"""

from __future__ import annotations

import httpx

from prefect_gptimage.errors import (
    ConfigurationError,
    FalError,
    GptImageError,
    PermanentFalError,
    TransientFalError,
)
from prefect_gptimage.retry import (
    fal_response_error,
    fal_transport_error,
)
from prefect_gptimage.schemas import check_request_id


def _checked_id(error: FalError, operation: str, known: str | None) -> str | None:
    """The request id an error may carry on: the one it names (``x-fal-request-id``) if it is a
    fal request id, else the id of the request concerned. A submit's 5xx keeps the id it names,
    whatever it is: the core checks it before adopting (a malformed one: outcome unknown)."""
    named = error.request_id
    if named is None:
        return known
    if operation == "submit" and (error.status_code or 0) >= 500:
        return named
    try:
        return check_request_id(named)
    except ValueError:
        return known


def classify(exc: BaseException, *, operation: str, request_id: str | None = None) -> GptImageError:
    """Map ``exc`` (from fal_client or httpx) to the package hierarchy.

    Example:
        >>> classify(httpx.ReadTimeout("slow"), operation="status").transient
        True
    """
    if isinstance(exc, GptImageError):
        if isinstance(exc, FalError):
            exc.request_id = _checked_id(exc, operation, request_id)
        return exc
    import fal_client  # deferred: fal_client reads its hosts from the environment at import
    from fal_client.auth import MissingCredentialsError

    if isinstance(exc, fal_client.FalClientHTTPError | httpx.HTTPStatusError):
        return fal_response_error(exc.response, operation, request_id)
    if isinstance(exc, fal_client.FalClientTimeoutError):
        return TransientFalError(f"fal {operation} timed out", request_id=request_id)
    if isinstance(exc, httpx.TransportError):
        return fal_transport_error(exc, operation, "fal")
    if isinstance(exc, MissingCredentialsError):
        return ConfigurationError(
            "No fal credentials: set FAL_KEY (or FAL_KEY_ID and FAL_KEY_SECRET), "
            "or pass a FalCredentials block."
        )
    return PermanentFalError(
        f"fal {operation} failed: {type(exc).__name__}: {exc}", request_id=request_id
    )
