"""Typed inputs and outputs of ``fal-ai/gpt-image-1.5`` and ``fal-ai/gpt-image-1.5/edit``.

The models carry exactly fal's fields, allowed values, ranges and defaults, so that an
invalid request fails here, before any network call (and before any money is spent).
Unknown fields are rejected too: a typo such as ``qualty`` would otherwise be silently
ignored by fal and the default ``high`` quality billed.

Example:
    >>> req = GptImageRequest(prompt="a lighthouse at dawn", quality="low")
    >>> req.endpoint
    'fal-ai/gpt-image-1.5'
    >>> req.to_arguments()["image_size"]
    '1024x1024'
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prefect_gptimage.errors import InvalidRequestError

TEXT_TO_IMAGE_ENDPOINT = "fal-ai/gpt-image-1.5"
EDIT_ENDPOINT = "fal-ai/gpt-image-1.5/edit"
ENDPOINTS = (TEXT_TO_IMAGE_ENDPOINT, EDIT_ENDPOINT)

ImageSize = Literal["1024x1024", "1536x1024", "1024x1536"]
EditImageSize = Literal["auto", "1024x1024", "1536x1024", "1024x1536"]
Background = Literal["auto", "transparent", "opaque"]
Quality = Literal["low", "medium", "high"]
OutputFormat = Literal["jpeg", "png", "webp"]
InputFidelity = Literal["low", "high"]

CONTENT_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}


class _RequestBase(BaseModel):
    """Fields shared by both endpoints (fal-protocol §4.1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: ClassVar[str]

    prompt: str = Field(min_length=2, max_length=32000, description="What to draw.")
    background: Background = "auto"
    quality: Quality = Field(default="high", description="Drives price; fal's default is high.")
    num_images: int = Field(default=1, ge=1, le=4)
    output_format: OutputFormat = "png"
    sync_mode: bool = Field(
        default=False,
        description="Return images as data: URIs and keep them out of fal's request history.",
    )

    def to_arguments(self) -> dict[str, Any]:
        """The JSON body for fal, every default spelled out (the normalized request)."""
        return self.model_dump(mode="json", exclude_none=True)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.output_format]

    @property
    def profile(self) -> str:
        """What the latency depends on: endpoint, quality, size and image count."""
        size = getattr(self, "image_size", "")
        return f"{self.endpoint}/{self.quality}/{size}/{self.num_images}"

    def expected_size(self) -> tuple[int, int] | None:
        """(width, height) the images must have, or None when fal picks (edit ``auto``)."""
        size = getattr(self, "image_size", "auto")
        if size == "auto":
            return None
        w, h = size.split("x")
        return int(w), int(h)


class GptImageRequest(_RequestBase):
    """Input of ``fal-ai/gpt-image-1.5`` (text to image)."""

    endpoint: ClassVar[str] = TEXT_TO_IMAGE_ENDPOINT

    image_size: ImageSize = "1024x1024"


class GptImageEditRequest(_RequestBase):
    """Input of ``fal-ai/gpt-image-1.5/edit``.

    Example:
        >>> GptImageEditRequest(prompt="make it night", image_urls=["https://x/a.png"]).image_size
        'auto'
    """

    endpoint: ClassVar[str] = EDIT_ENDPOINT

    image_urls: list[str] = Field(min_length=1, description="Images to edit (URLs or data: URIs).")
    image_size: EditImageSize = "auto"
    input_fidelity: InputFidelity = "high"
    mask_image_url: str | None = Field(default=None, description="What part of the image to edit.")


AnyRequest = GptImageRequest | GptImageEditRequest


def parse_request(data: dict[str, Any]) -> AnyRequest:
    """Build the right request model from plain fields.

    A request with ``image_urls`` goes to the edit endpoint; anything else is text to image.
    Raises :class:`InvalidRequestError` naming the offending field.

    Example:
        >>> parse_request({"prompt": "hi there", "image_urls": ["https://x/y.png"]}).endpoint
        'fal-ai/gpt-image-1.5/edit'
    """
    model: type[AnyRequest] = GptImageEditRequest if data.get("image_urls") else GptImageRequest
    clean = {k: v for k, v in data.items() if v is not None}
    try:
        return model.model_validate(clean)
    except ValidationError as exc:
        raise InvalidRequestError.from_validation_error(exc) from None


def request_for_endpoint(endpoint: str, arguments: dict[str, Any]) -> AnyRequest:
    """Validate ``arguments`` against the schema of ``endpoint``."""
    models: dict[str, type[AnyRequest]] = {
        TEXT_TO_IMAGE_ENDPOINT: GptImageRequest,
        EDIT_ENDPOINT: GptImageEditRequest,
    }
    if endpoint not in models:
        raise InvalidRequestError(
            "endpoint", f"unknown endpoint {endpoint!r}; use one of {ENDPOINTS}"
        )
    try:
        return models[endpoint].model_validate(arguments)
    except ValidationError as exc:
        raise InvalidRequestError.from_validation_error(exc) from None


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


class RequestHandle(BaseModel):
    """A submitted fal request: small, serializable, safe to persist (no client, no key).

    Carries the URLs fal returned on submit, which are the ones to use for status, result and
    cancel (fal-protocol §1.2).
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
