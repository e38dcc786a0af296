"""Typed inputs and outputs of ``fal-ai/gpt-image-1.5`` and ``fal-ai/gpt-image-1.5/edit``.

The models carry exactly fal's fields, allowed values, ranges and defaults, so that an
invalid request fails here, before any network call (and before any money is spent).
Unknown fields are rejected too: a typo such as ``qualty`` would otherwise be silently
ignored by fal and the default ``high`` quality billed. The error names the field it was
probably meant to be (``qualty: Extra inputs are not permitted; did you mean 'quality'?``).

Example:
    >>> req = GptImageRequest(prompt="a lighthouse at dawn", quality="low")
    >>> req.endpoint
    'fal-ai/gpt-image-1.5'
    >>> req.to_arguments()["image_size"]
    '1024x1024'
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from prefect_gptimage.errors import (
    ImageCountMismatch,
    InvalidRequestError,
)

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

#: Default cap on one queue answer (``PREFECT_GPTIMAGE_MAX_RESULT_BYTES``): four ``sync_mode``
#: images of the largest size GPT Image 1.5 makes (1536x1024 RGBA, at most ~6.3 MB even
#: incompressible, ~8.4 MB as base64) fit. Reading, validating and caching a result (Prefect's
#: record copies it) takes ~6x its size, so this is what keeps a process under 500 MB (a 60 MiB
#: result reached 558 MiB; ``tests/test_memory.py``).
DEFAULT_MAX_BODY_BYTES = 36 * 1024 * 1024

#: URL schemes fal accepts for input images: a URL it can fetch, or an inline ``data:`` URI.
INPUT_URL_SCHEMES = ("https", "http", "data")


def check_input_url(url: str) -> str:
    """``url`` if fal can fetch it as an input image (http(s) with a host, or ``data:``).

    Anything else (``javascript:``, ``file:///...``, a bare word, a relative path) would be
    refused by fal only at submit, so it is refused here, before anything is paid for.

    Example:
        >>> check_input_url("https://example.com/a.png")
        'https://example.com/a.png'
        >>> check_input_url("file:///etc/passwd")
        Traceback (most recent call last):
        ...
        ValueError: must be an http(s) URL or a data: URI, got scheme 'file'
    """
    if not isinstance(url, str):  # pragma: no cover - the field's type is checked first
        raise ValueError("must be a string URL")
    text = url.strip()
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if not sep or not scheme.isascii() or not scheme.isalpha():
        raise ValueError(f"must be an http(s) URL or a data: URI, got {shorten(url)!r}")
    if scheme not in INPUT_URL_SCHEMES:
        raise ValueError(f"must be an http(s) URL or a data: URI, got scheme {scheme!r}")
    if scheme == "data":
        if "," not in rest:
            raise ValueError("a data: URI needs a ',' before its payload")
    elif not rest.startswith("//") or not _AUTHORITY.match(rest[2:]):
        raise ValueError(f"an {scheme} URL needs a host, got {shorten(url)!r}")
    return url


#: A URL's host part after ``//``: something before the first ``/``, ``?`` or ``#`` (and ``@``).
_AUTHORITY = re.compile(r"^(?:[^/?#@]*@)?[^/?#@:]+")


def shorten(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters for one line of output (``...`` marks the cut).

    Example:
        >>> shorten("a lighthouse on a rocky coast at dawn", 20)
        'a lighthouse on a...'
    """
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Validation context key: more names a caller accepts beside the model's fields (a prompt
#: file's ``variant`` column), offered as suggestions for a misspelt field.
KNOWN_NAMES_CONTEXT = "known_names"


def did_you_mean(name: str, known: Iterable[str]) -> str | None:
    """The known name ``name`` is most likely a typo of, if one is close enough.

    Example:
        >>> did_you_mean("qualty", ["prompt", "quality", "num_images"])
        'quality'
        >>> did_you_mean("colour", ["prompt", "quality"]) is None
        True
    """
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return close[0] if close else None


def _with_suggestions(exc: ValidationError, known: Iterable[str]) -> list[InitErrorDetails] | None:
    """``exc``'s errors, each unknown field's message ending in ``did you mean 'x'?`` where a
    known name is close; None when there is nothing to suggest."""
    names = list(known)
    details: list[InitErrorDetails] = []
    suggested = False
    for error in exc.errors():
        loc, name = error["loc"], str(error["loc"][-1]) if error["loc"] else ""
        guess = did_you_mean(name, names) if error["type"] == "extra_forbidden" else None
        if guess is not None:
            suggested = True
            kind: Any = PydanticCustomError(
                "extra_forbidden",
                "Extra inputs are not permitted; did you mean '{suggestion}'?",
                {"suggestion": guess},
            )
            details.append(InitErrorDetails(type=kind, loc=loc, input=error["input"]))
        elif "ctx" in error:
            details.append(
                InitErrorDetails(
                    type=error["type"], loc=loc, input=error["input"], ctx=error["ctx"]
                )
            )
        else:
            details.append(InitErrorDetails(type=error["type"], loc=loc, input=error["input"]))
    return details if suggested else None


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

    @model_validator(mode="wrap")
    @classmethod
    def _suggest_fields(
        cls, data: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        """An unknown field's error says which field it probably is (``did you mean``)."""
        try:
            return handler(data)
        except ValidationError as exc:
            extra = (info.context or {}).get(KNOWN_NAMES_CONTEXT, ())
            details = _with_suggestions(exc, [*cls.model_fields, *extra])
            if details is None:
                raise
            raise ValidationError.from_exception_data(exc.title, details) from None

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain text, not only whitespace")
        return value

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

    @field_validator("image_urls")
    @classmethod
    def _input_urls(cls, value: list[str]) -> list[str]:
        for position, url in enumerate(value):
            try:
                check_input_url(url)
            except ValueError as exc:
                raise ValueError(f"item {position}: {exc}") from None
        return value

    @field_validator("mask_image_url")
    @classmethod
    def _mask_url(cls, value: str | None) -> str | None:
        return value if value is None else check_input_url(value)


AnyRequest = GptImageRequest | GptImageEditRequest


def parse_request(data: dict[str, Any], known_names: Iterable[str] = ()) -> AnyRequest:
    """Build the right request model from plain fields.

    A request with ``image_urls`` goes to the edit endpoint; anything else is text to image.
    Raises :class:`InvalidRequestError` naming the offending field; a misspelt one with the
    field it probably is (``known_names``: more names to suggest, e.g. a prompt file's columns).

    Example:
        >>> parse_request({"prompt": "hi there", "image_urls": ["https://x/y.png"]}).endpoint
        'fal-ai/gpt-image-1.5/edit'
    """
    model: type[AnyRequest] = GptImageEditRequest if data.get("image_urls") else GptImageRequest
    clean = {k: v for k, v in data.items() if v is not None}
    try:
        return model.model_validate(clean, context={KNOWN_NAMES_CONTEXT: tuple(known_names)})
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


# --- the identity of a paid request (the submit cache keys on it) ---------------------------------

_SIGNED_QUERY = re.compile(r"(^|&)(X-Amz-Signature|Signature|X-Goog-Signature|sig)=", re.I)


def stable_url(url: str) -> str:
    """A presigned URL without its query: the same object however (and whenever) it was signed.

    Example:
        >>> stable_url("https://b.s3.amazonaws.com/k.png?X-Amz-Date=1&X-Amz-Signature=ab")
        'https://b.s3.amazonaws.com/k.png'
    """
    base, _, query = url.partition("?")
    return base if query and _SIGNED_QUERY.search(query) else url


def request_fingerprint(request: AnyRequest, variant: int = 0) -> str:
    """sha256 of the endpoint and the normalized request: the identity of a paid request.

    Input images given as presigned URLs count by object, not by signature, so an edit of a
    staged image is the same request on every run.
    """
    arguments = request.to_arguments()
    for field in ("image_urls", "mask_image_url"):
        value = arguments.get(field)
        if isinstance(value, list):
            arguments[field] = [stable_url(u) for u in value]
        elif isinstance(value, str):
            arguments[field] = stable_url(value)
    canonical = json.dumps(
        {"endpoint": request.endpoint, "arguments": arguments, "variant": variant},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
