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
    submit_outcome_unknown,
)


def classify(exc: BaseException, *, operation: str, request_id: str | None = None) -> GptImageError:
    """Map ``exc`` (from fal_client or httpx) to the package hierarchy.

    Example:
        >>> classify(httpx.ReadTimeout("slow"), operation="status").transient
        True
    """
    if isinstance(exc, GptImageError):
        if isinstance(exc, FalError) and exc.request_id is None:
            exc.request_id = request_id
        return exc
    import fal_client  # deferred: fal_client reads its hosts from the environment at import

    if isinstance(exc, fal_client.FalClientHTTPError | httpx.HTTPStatusError):
        return fal_response_error(exc.response, operation, request_id)
    if isinstance(exc, fal_client.FalClientTimeoutError):
        return TransientFalError(f"fal {operation} timed out", request_id=request_id)
    if isinstance(exc, httpx.TransportError):
        return fal_transport_error(exc, operation, "fal")
    if type(exc).__name__ == "MissingCredentialsError":
        return ConfigurationError(
            "No fal credentials: set FAL_KEY (or FAL_KEY_ID and FAL_KEY_SECRET), "
            "or pass a FalCredentials block."
        )
    if operation == "submit" and isinstance(exc, KeyError | ValueError):
        # fal answered 2xx, so it almost certainly enqueued (and will bill) the request
        return submit_outcome_unknown("fal", f"a success answer without a request id: {exc!r}")
    return PermanentFalError(
        f"fal {operation} failed: {type(exc).__name__}: {exc}", request_id=request_id
    )
