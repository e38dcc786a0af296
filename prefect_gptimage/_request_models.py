"""fal's request models for ``fal-ai/gpt-image-1.5`` and ``/edit``, and the checks on their fields.

Exactly fal's fields, allowed values, ranges and defaults, so that an invalid request fails
before any network call; an unknown field fails too, its error naming the field it probably is
(:func:`did_you_mean`); input image URLs must be something fal can fetch
(:func:`check_input_url`). Imported through :mod:`prefect_gptimage.schemas`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from prefect_gptimage._input_refs import InputSource, check_input_ref, input_kind
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
    #: Fields that are the package's own record, never sent to fal (see :meth:`to_arguments`).
    local_fields: ClassVar[frozenset[str]] = frozenset()

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
        return self.model_dump(mode="json", exclude_none=True, exclude=set(self.local_fields))

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

    ``image_urls`` and ``mask_image_url`` take http(s) URLs and ``data:`` URIs (fal fetches
    them), and also absolute local paths and ``s3://bucket/key`` URIs: those are read, checked
    and made fetchable by :mod:`prefect_gptimage.inputs` before anything is submitted, which
    records each input's sha256 in ``input_sources`` (the request's identity, never sent).

    The mask (OpenAI's definition, which fal passes on): a PNG with an alpha channel, the size
    of the first image, whose fully transparent pixels (alpha 0) mark where the first image is
    edited. When both sizes are known (the inputs were read), a mismatch is refused here.

    Example:
        >>> GptImageEditRequest(prompt="make it night", image_urls=["https://x/a.png"]).image_size
        'auto'
    """

    endpoint: ClassVar[str] = EDIT_ENDPOINT
    local_fields: ClassVar[frozenset[str]] = frozenset({"input_sources"})

    image_urls: list[str] = Field(
        min_length=1,
        description="Images to edit: URLs, data: URIs, absolute local paths or s3:// URIs.",
    )
    image_size: EditImageSize = "auto"
    input_fidelity: InputFidelity = "high"
    mask_image_url: str | None = Field(
        default=None,
        description="Where to edit the first image: its fully transparent pixels (a PNG mask).",
    )
    input_sources: tuple[InputSource, ...] = Field(
        default=(),
        description="What each input was read from, with its sha256 (filled in when the "
        "inputs are made fetchable; the request's identity; never sent to fal).",
    )

    @field_validator("image_urls")
    @classmethod
    def _input_urls(cls, value: list[str]) -> list[str]:
        for position, url in enumerate(value):
            try:
                check_input_ref(url)
            except ValueError as exc:
                raise ValueError(f"item {position}: {exc}") from None
        return value

    @field_validator("mask_image_url")
    @classmethod
    def _mask_url(cls, value: str | None) -> str | None:
        return value if value is None else check_input_ref(value)

    @model_validator(mode="after")
    def _mask_fits_its_image(self) -> GptImageEditRequest:
        """A mask must be the first image's size (checked when both were read)."""
        images = [s for s in self.input_sources if s.role == "image" and s.index == 0]
        masks = [s for s in self.input_sources if s.role == "mask"]
        if images and masks:
            first, mask = images[0], masks[0]
            if (first.width, first.height) != (mask.width, mask.height):
                raise PydanticCustomError(
                    "mask_size",
                    "mask_image_url: the mask {mask} is {mask_size}, its image {image} is "
                    "{image_size}: they must be the same size",
                    {
                        "mask": shorten(mask.source),
                        "mask_size": f"{mask.width}x{mask.height}",
                        "image": shorten(first.source),
                        "image_size": f"{first.width}x{first.height}",
                    },
                )
        return self

    @model_serializer(mode="wrap")
    def _sources_only_when_read(self, handler: SerializerFunctionWrapHandler) -> Any:
        """``input_sources`` is stored only when inputs were read: a request without it
        serializes as exactly what fal gets (as before inputs were read)."""
        data = handler(self)
        if isinstance(data, dict) and not data.get("input_sources", True):
            del data["input_sources"]
        return data

    @property
    def unresolved_inputs(self) -> list[str]:
        """The inputs fal cannot fetch yet (local paths, ``s3://`` URIs), in order."""
        refs = [*self.image_urls, *([self.mask_image_url] if self.mask_image_url else [])]
        return [r for r in refs if input_kind(r) in ("local", "s3")]


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
