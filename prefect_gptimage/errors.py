"""The exception hierarchy: every failure is either transient (worth retrying) or permanent.

::

    GptImageError
    ├── InvalidRequestError          bad input, raised before any network call
    │   ├── InvalidPromptFile        bad rows in a prompt file (every one listed)
    │   └── InputImageError          an edit's input cannot be read, is no image, is too large
    ├── ConfigurationError           missing key, bad setting
    ├── FalError                     something fal (or the way to it) said or did
    │   ├── TransientFalError        429, 408/409, 5xx, timeouts, dropped connections
    │   ├── PermanentFalError        4xx (401, 403, 404, 422, ...), failed validation at fal
    │   ├── FalRequestFailed         the request itself ended failed at fal (COMPLETED + error)
    │   ├── FalRequestTimeout        our own deadline passed; the fal request was cancelled
    │   ├── SubmitOutcomeUnknown     the submit was sent but no answer came back: NOT retried
    │   ├── ImageCountMismatch       fal returned more or fewer images than num_images
    │   ├── DuplicateRequestId       one fal request id for two different submits
    │   ├── RowInterrupted           a stop left the row unstarted, or running at fal
    │   └── OcrGateFailed            a row the OCR gate could not pass
    ├── DownloadError                fetching or verifying an image
    │   ├── TransientDownloadError
    │   └── PermanentDownloadError   wrong format/size, not https, host not allowed, too big
    ├── S3StagingError               staging to S3
    │   ├── TransientS3StagingError  throttling, 5xx, timeouts, dropped connections
    │   └── PermanentS3StagingError  missing bucket, access denied, bad credentials
    ├── PrefectApiUnavailable        transient: the Prefect API did not answer (global slots)
    ├── LockServiceUnavailable       transient: the lock service (Redis) did not answer
    ├── BatchIncomplete              a batch finished with failed rows; carries the summary
    └── PaidRequestFailed            a row failed after fal accepted its request: carries the
                                     request id, whether this run paid, and the error itself

    StopBeforeStart (an Exception, not a GptImageError): the CLI's signal handler stops a
    command before its flow started; it is control flow, never a row's failure.

Which outcome is transient is decided in :mod:`prefect_gptimage.retry`; retries look only at
:attr:`GptImageError.transient`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError


class GptImageError(Exception):
    """Base of every error this package raises."""

    transient: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidRequestError(GptImageError, ValueError):
    """Input that fal would reject (or silently mis-bill), caught before any network call.

    ``field`` names the offending field, e.g. ``num_images``.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")

    @classmethod
    def from_validation_error(cls, exc: ValidationError) -> InvalidRequestError:
        errors = exc.errors()
        first = errors[0]
        field = ".".join(str(p) for p in first["loc"]) or "request"
        parts = []
        for err in errors:
            loc = ".".join(str(p) for p in err["loc"]) or "request"
            parts.append(f"{loc}: {err['msg']}")
        result = cls(field, "; ".join(parts))
        result.message = "; ".join(parts)
        return result


class ConfigurationError(GptImageError):
    """Something in the environment or a block is missing or wrong."""


class BudgetExhausted(GptImageError):
    """The fleet's spend budget (a Prefect global concurrency limit) cannot cover a request:
    it was not submitted, nothing was paid, and a later run submits it."""


class FalError(GptImageError):
    """A failure reported by fal or met on the way to it.

    Attributes:
        status_code: HTTP status, when there was a response.
        error_type: fal's ``error_type`` (body or ``X-Fal-Error-Type``),
            e.g. ``runner_server_error``.
        request_id: the fal request concerned, when known.
        detail: fal's ``detail`` (a string, or the list of validation errors).
        paid: fal accepted (and bills) the request before this error (a wrong image count, a
            request id answered twice): the run summary counts it in ``submitted`` and the cost.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_type: str | None = None,
        request_id: str | None = None,
        detail: Any = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.request_id = request_id
        self.detail = detail
        self.paid = False


class TransientFalError(FalError):
    """Worth retrying: rate limits, server errors, timeouts, dropped connections."""

    transient = True


class PermanentFalError(FalError):
    """Retrying cannot help: bad key, validation failure at fal, content refused, not found."""


class FalRequestFailed(FalError):
    """The request ran at fal and ended failed (status COMPLETED with ``error``).

    Polling it again cannot help, so it is never *retried*. :attr:`resubmittable` says whether a
    fresh submit may succeed: fal does not bill 5xx failures (infrastructure, runner errors),
    while a 4xx (e.g. ``content_policy_violation``) would fail again and may be billed.
    """

    @property
    def resubmittable(self) -> bool:
        if self.status_code is not None:
            return self.status_code >= 500 or self.status_code == 429
        return self.error_type in SERVER_SIDE_ERROR_TYPES


class FalRequestTimeout(FalError):
    """Our own deadline passed while waiting; the fal request was cancelled (not retried)."""


class SubmitOutcomeUnknown(FalError):
    """The submit reached the network but no answer came back.

    fal may have accepted (and will bill) the request, and the queue API has no idempotency key,
    so it is deliberately *not* retried: retrying could pay twice for one image.
    """


class ImageCountMismatch(FalError):
    """fal's result holds a different number of images than the request's ``num_images``.

    Permanent (polling again returns the same result). The request was paid for: the images that
    did arrive are kept (``delivered``), and the shortfall (or the surplus) is reported for the
    row. ``error_type`` is ``image_count_mismatch`` in the summary and the manifest.
    """

    def __init__(
        self,
        message: str,
        *,
        expected: int = 0,
        delivered: int = 0,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, error_type="image_count_mismatch", request_id=request_id)
        self.expected = expected
        self.delivered = delivered

    def __reduce__(self) -> Any:  # keyword attributes survive pickling (Prefect persists states)
        return _rebuild, (type(self), self.message, self.__dict__)


class DuplicateRequestId(FalError):
    """fal returned one request id for two different submits of the same run.

    Staging that result under both rows' names would label one image with two prompts, so every
    row involved fails. ``error_type`` is ``duplicate_request_id``.
    """

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message, error_type="duplicate_request_id", request_id=request_id)

    def __reduce__(self) -> Any:
        return _rebuild, (type(self), self.message, self.__dict__)


def _rebuild(cls: type[FalError], message: str, state: dict[str, Any]) -> FalError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class DownloadError(GptImageError):
    """Fetching or verifying a generated image failed."""


class TransientDownloadError(DownloadError):
    transient = True


class PermanentDownloadError(DownloadError):
    """The bytes are not what was promised, or the URL is not one we may fetch."""


#: fal's infrastructure error types (fal-protocol §1.7): the request never really ran, not billed.
SERVER_SIDE_ERROR_TYPES = frozenset(
    {
        "request_timeout",
        "startup_timeout",
        "runner_scheduling_failure",
        "runner_connection_timeout",
        "runner_disconnected",
        "runner_connection_refused",
        "runner_connection_error",
        "runner_incomplete_response",
        "runner_server_error",
        "internal_error",
    }
)


def is_transient(exc: BaseException) -> bool:
    """True when retrying ``exc`` may succeed (used by the Prefect retry conditions)."""
    return isinstance(exc, GptImageError) and exc.transient


class InvalidPromptFile(InvalidRequestError):
    """One or more rows of a prompt file are invalid (nothing was submitted)."""

    def __init__(self, path: str, problems: list[tuple[int, str, str]]) -> None:
        self.problems = problems
        shown = "; ".join(f"line {line}: {msg}" for line, _, msg in problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        super().__init__(problems[0][1], f"{path}: {shown}{more}")
        self.message = f"{path}: {shown}{more}"


class InputImageError(InvalidRequestError):
    """An edit's input image cannot be used: a missing or unreadable file, a missing S3 object,
    access denied, not an image, too large. One line naming the input; raised before anything
    is submitted.

    ``field`` is ``image_urls`` or ``mask_image_url``; ``source`` the input as the user named it.
    """

    def __init__(self, field: str, source: str, reason: str) -> None:
        self.source, self.reason = source, reason
        shown = source if len(source) <= 200 else source[:197] + "..."
        super().__init__(field, f"{shown}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.field, self.source, self.reason))


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


class TransientS3StagingError(S3StagingError):
    """Throttling, 5xx, timeouts, dropped connections: worth retrying."""

    transient = True


class PermanentS3StagingError(S3StagingError):
    """Missing bucket, access denied, bad credentials, bad local file: retrying cannot help."""

    transient = False


class BatchIncomplete(GptImageError):
    """A batch in which at least one row failed; ``summary`` has the images and the failures.

    A plain call of ``batch_to_s3`` raises it, so the caller still gets the summary::

        try:
            summary = batch_to_s3("prompts.jsonl", bucket="my-images")
        except BatchIncomplete as exc:
            summary = exc.summary
    """

    def __init__(self, summary: Any, message: str | None = None) -> None:
        #: the batch's :class:`~prefect_gptimage.reporting.summary.RunSummary` (typed ``Any`` here
        #: so that the bottom of the package imports nothing above it)
        self.summary = summary
        super().__init__(message or f"{len(summary.failures)} request(s) failed")

    def __reduce__(self) -> tuple[type[BatchIncomplete], tuple[Any, str]]:
        return type(self), (self.summary, self.message)


class PrefectApiUnavailable(GptImageError):
    """The Prefect API did not answer (refused, 5xx, ...) while a global slot was looked up,
    taken or given back. Transient: retried within ``PREFECT_GPTIMAGE_RETRY_BUDGET``."""

    transient = True


class LockServiceUnavailable(GptImageError, RuntimeError):
    """The lock service (``PREFECT_GPTIMAGE_LOCK_URL``) did not answer within the retry budget.

    Transient, like :class:`PrefectApiUnavailable`: each lock call is retried under
    :meth:`~prefect_gptimage.retry.RetryPolicy.from_settings` before this reaches the row.
    Raised while taking or waiting for a lock, it means nothing was submitted (its message says
    so).
    """

    transient = True


class RowInterrupted(FalError):
    """A row a stop left unstarted (nothing paid) or running at fal (a re-run resumes it)."""


class OcrGateFailed(FalError):
    """A row the gate could not pass: how it is reported (manifest failure line, summary).

    ``error_type`` is ``ocr_mismatch`` when OCR kept rejecting its images, else the error
    that stopped its request (``request_id``: the row's last request).
    """


class StopBeforeStart(Exception):
    """A signal arrived before the flow started: nothing was submitted (or what a head start
    submitted is recorded, and a re-run resumes it).

    Not a :class:`GptImageError`: it is the CLI's control flow (raised by its signal handler,
    caught by the command), never the failure of a request or a row.
    """


class PaidRequestFailed(GptImageError):
    """A row that failed after fal accepted its request (a full disk, S3, a bad image, an
    interrupt): the accepted request stays on the books.

    ``error`` is what failed (also ``__cause__``; the summary reports its type and message),
    ``request_id`` the request fal accepted, ``paid`` whether this run paid for it (False: it
    was cached, or paid by an earlier run). The run summary counts a paid one in ``submitted``
    and in the cost, so the summary never says less was paid than fal billed.
    """

    def __init__(self, error: BaseException, request_id: str, paid: bool) -> None:
        named = isinstance(error, GptImageError)
        super().__init__(str(error) if named else f"{type(error).__name__}: {error}")
        self.error, self.request_id, self.paid = error, request_id, paid
        self.transient = bool(getattr(error, "transient", False))

    def __reduce__(self) -> tuple[Any, ...]:  # pickled with task states (e.g. Dask workers)
        return (type(self), (self.error, self.request_id, self.paid))
