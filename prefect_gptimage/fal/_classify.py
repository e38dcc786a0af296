"""Turn whatever fal_client or httpx raised into the package's transient/permanent hierarchy.

The rules follow fal's documented error shapes (fal-protocol §1.7, §2.3-2.5):

============================================  ==========================================
what came back                                classified as
============================================  ==========================================
408, 409, 429                                 transient
5xx (json style or ingress style)             transient, unless ``X-Fal-Retryable: false``
504 with ``X-Fal-Request-Timeout-Type: user`` permanent (the caller's own start timeout)
other 4xx (401, 403, 404, 422, ...)           permanent, unless ``X-Fal-Retryable: true``
httpx timeouts and transport errors           transient
``FalClientTimeoutError``                     transient
missing credentials                           :class:`ConfigurationError`
============================================  ==========================================

Messages carry fal's own ``detail`` text; never a header value, so never the key.
"""

from __future__ import annotations

from typing import Any

import httpx

from prefect_gptimage.errors import (
    ConfigurationError,
    FalError,
    GptImageError,
    PermanentFalError,
    TransientFalError,
)

TRANSIENT_STATUS_CODES = frozenset({408, 409, 429})


def detail_text(detail: Any) -> str:
    """fal's ``detail`` as one readable line (a string, or a list of validation errors)."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                msg = item.get("msg") or item.get("type") or "invalid"
                parts.append(f"{loc}: {msg}" if loc else str(msg))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def is_transient_status(status_code: int, headers: httpx.Headers | dict[str, str]) -> bool:
    """Whether an HTTP error status from fal is worth retrying."""
    lower = {k.lower(): v for k, v in headers.items()}
    retryable = lower.get("x-fal-retryable", "").strip().lower()
    if retryable in ("true", "false"):
        return retryable == "true"
    if status_code == 504 and lower.get("x-fal-request-timeout-type"):
        return False
    return status_code in TRANSIENT_STATUS_CODES or status_code >= 500


def from_http_response(
    status_code: int,
    headers: httpx.Headers | dict[str, str],
    body: Any,
    *,
    operation: str,
    request_id: str | None = None,
) -> FalError:
    """Build the right :class:`FalError` for an error response of ``operation``."""
    lower = {k.lower(): v for k, v in headers.items()}
    error_type = None
    detail: Any = body
    if isinstance(body, dict):
        detail = body.get("detail", body)
        error_type = body.get("error_type")
    error_type = error_type or lower.get("x-fal-error-type")
    text = detail_text(detail) if detail not in (None, "") else f"HTTP {status_code}"
    if not isinstance(body, dict) and "nginx" in str(body):
        text = f"HTTP {status_code} from fal's gateway"
    message = f"fal {operation} failed with HTTP {status_code}"
    if error_type:
        message += f" ({error_type})"
    message += f": {text}"
    cls = TransientFalError if is_transient_status(status_code, lower) else PermanentFalError
    return cls(
        message,
        status_code=status_code,
        error_type=error_type,
        request_id=request_id or lower.get("x-fal-request-id"),
        detail=detail,
    )


def classify(exc: BaseException, *, operation: str, request_id: str | None = None) -> GptImageError:
    """Map ``exc`` (from fal_client or httpx) to the package hierarchy.

    Example:
        >>> classify(httpx.ReadTimeout("slow"), operation="status").transient
        True
    """
    if isinstance(exc, GptImageError):
        return exc
    import fal_client  # deferred: fal_client reads its hosts from the environment at import

    if isinstance(exc, fal_client.FalClientHTTPError):
        response = exc.response
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        return from_http_response(
            exc.status_code, response.headers, body, operation=operation, request_id=request_id
        )
    if isinstance(exc, httpx.HTTPStatusError):
        response = exc.response
        return from_http_response(
            response.status_code,
            response.headers,
            response.text,
            operation=operation,
            request_id=request_id,
        )
    if isinstance(exc, fal_client.FalClientTimeoutError | httpx.TimeoutException):
        return TransientFalError(
            f"fal {operation} timed out ({type(exc).__name__})", request_id=request_id
        )
    if isinstance(exc, httpx.TransportError):
        return TransientFalError(
            f"fal {operation}: connection problem ({type(exc).__name__})", request_id=request_id
        )
    if type(exc).__name__ == "MissingCredentialsError":
        return ConfigurationError(
            "No fal credentials: set FAL_KEY (or FAL_KEY_ID and FAL_KEY_SECRET), "
            "or pass a FalCredentials block."
        )
    return PermanentFalError(
        f"fal {operation} failed: {type(exc).__name__}: {exc}", request_id=request_id
    )
