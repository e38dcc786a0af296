"""What fal answers and what a request produced: outputs, handles, verified images, results.

fal's output models (:class:`GptImageOutput`), the handle of a submitted request
(:class:`RequestHandle`, its id checked by :func:`check_request_id`), an image verified on disk
(:class:`DownloadedImage`), everything one request produced (:class:`GenerationResult`), and the
check that the images add up to what was asked (:func:`check_image_count`). Imported through
:mod:`prefect_gptimage.schemas`.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prefect_gptimage._request_models import AnyRequest, OutputFormat
from prefect_gptimage.errors import ImageCountMismatch

#: Default cap on one queue answer (``PREFECT_GPTIMAGE_MAX_RESULT_BYTES``): four ``sync_mode``
#: images of the largest size GPT Image 1.5 makes (1536x1024 RGBA, at most ~6.3 MB even
#: incompressible, ~8.4 MB as base64) fit. Reading, validating and caching a result (Prefect's
#: record copies it) takes ~6x its size, so this is what keeps a process under 500 MB (a 60 MiB
#: result reached 558 MiB; ``tests/test_memory.py``).
DEFAULT_MAX_BODY_BYTES = 36 * 1024 * 1024


class ImageFile(BaseModel):
    """One image of fal's output (fal-protocol §4.3)."""

    model_config = ConfigDict(extra="allow")

    url: str
    content_type: str | None = None
    file_name: str | None = None
    file_size: int | None = None
    width: int | None = None
    height: int | None = None


class GptImageOutput(BaseModel):
    """Output of both endpoints: exactly one field, ``images``."""

    model_config = ConfigDict(extra="allow")

    images: list[ImageFile]


#: What a fal request id looks like: a UUID in its canonical 8-4-4-4-12 hex form, as fal documents
#: (``80e732af-660e-45cd-bd63-580e4f2a94cc``) and returns. The id becomes a part of queue URLs,
#: cache keys and file names, so nothing else (``/``, ``..``, an absolute path) is ever accepted.
REQUEST_ID_PATTERN = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE
)


def check_request_id(value: object) -> str:
    """``value`` if it is a fal request id (a UUID), else ValueError with one clear message.

    The one check of every request id fal answers with: :class:`RequestHandle` runs it on
    construction (a submit's answer) and on validation (a cached record read back), and the
    client layer before it adopts an id named by an error answer.

    Example:
        >>> check_request_id("80e732af-660e-45cd-bd63-580e4f2a94cc")
        '80e732af-660e-45cd-bd63-580e4f2a94cc'
        >>> check_request_id("../80e732af-660e-45cd-bd63-580e4f2a94cc")
        Traceback (most recent call last):
        ...
        ValueError: '../80e732af-660e-45cd-bd63-580e4f2a94cc' is not a fal request id (a UUID)
    """
    if isinstance(value, str) and REQUEST_ID_PATTERN.fullmatch(value):
        return value
    text = repr(value) if not isinstance(value, str) or len(value) <= 80 else repr(value[:77])
    raise ValueError(f"{text} is not a fal request id (a UUID)")


class RequestHandle(BaseModel):
    """A submitted fal request: small, serializable, safe to persist (no client, no key).

    Carries the URLs fal returned on submit, which are the ones to use for status, result and
    cancel (fal-protocol §1.2) once the client layer has checked that they stay on the
    configured queue host and name this very request. ``request_id`` is always a fal request id
    (:func:`check_request_id`): it can be used in a key, a file name or a URL path.
    """

    model_config = ConfigDict(frozen=True)

    endpoint: str
    request_id: str
    status_url: str | None = None
    response_url: str | None = None
    cancel_url: str | None = None
    submitted_at: float | None = Field(default=None, description="Unix time of the submit.")
    profile: str | None = Field(
        default=None, description="quality/size/n of the request, to learn its typical latency."
    )

    @field_validator("request_id", mode="before")
    @classmethod
    def _request_id(cls, value: object) -> str:
        return check_request_id(value)


class DownloadedImage(BaseModel):
    """An image verified on local disk: the unit that staging, manifests and artifacts consume."""

    path: str = Field(description="Local file path of the verified image.")
    source_url: str = Field(
        description="Where it came from (a fal media URL, or 'data:' for sync_mode)."
    )
    request_id: str
    endpoint: str
    index: int = Field(description="Position of the image within its request's output.")
    content_type: str
    format: OutputFormat
    width: int
    height: int
    bytes: int
    sha256: str


class GenerationResult(BaseModel):
    """Everything one request produced: the handle, fal's output, and the verified files."""

    handle: RequestHandle
    # No discriminator needed: both models forbid extra fields and only the edit model has (and
    # requires) ``image_urls``, so a persisted result validates back into the right class.
    request: AnyRequest = Field(description="The request that was submitted.")
    output: GptImageOutput
    images: list[DownloadedImage]
    from_cache: bool = Field(
        default=False, description="True when no submit was paid for: the request was cached."
    )
    also_paid: int = Field(
        default=0,
        ge=0,
        description=(
            "Requests this row paid for besides this one: an earlier submit of it whose outcome "
            "was unknown, sent again with resubmit_unknown, or one whose result fal expired."
        ),
    )


# -- what came back must add up ------------------------------------------------------------------


def check_image_count(
    request: AnyRequest,
    output: GptImageOutput,
    *,
    request_id: str | None = None,
    images: list[DownloadedImage] | None = None,
) -> None:
    """Raise :class:`ImageCountMismatch` unless ``output`` has exactly ``request.num_images``.

    fal bills the request however many images it returns, so an empty or short result is not a
    success, and a surplus is not silently staged. Call it after the delivered ``images`` are on
    disk, so that they are kept (and named in the message) even though the row fails.

    Example:
        >>> from prefect_gptimage.schemas import GptImageRequest
        >>> check_image_count(GptImageRequest(prompt="two kites", num_images=2),
        ...                   GptImageOutput(images=[ImageFile(url="https://v3.fal.media/a.png")]))
        Traceback (most recent call last):
        ...
        prefect_gptimage.errors.ImageCountMismatch: fal returned 1 image(s) for num_images=2: ...
    """
    expected, got = request.num_images, len(output.images)
    if got == expected:
        return
    shortfall = f"{expected - got} missing" if got < expected else f"{got - expected} extra"
    where = f" (request {request_id})" if request_id else ""
    message = f"fal returned {got} image(s) for num_images={expected}{where}: {shortfall}"
    if images:
        message += f"; the {len(images)} delivered image(s) are kept in {_folder(images)}"
    raise ImageCountMismatch(message, expected=expected, delivered=got, request_id=request_id)


def _folder(images: list[DownloadedImage]) -> str:
    folders = sorted({str(image.path).rsplit("/", 1)[0] for image in images})
    return folders[0] if len(folders) == 1 else ", ".join(folders)
