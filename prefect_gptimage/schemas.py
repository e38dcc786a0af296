"""Typed inputs and outputs of ``fal-ai/gpt-image-1.5`` and ``fal-ai/gpt-image-1.5/edit``.

The models carry exactly fal's fields, allowed values, ranges and defaults, so that an
invalid request fails here, before any network call (and before any money is spent).
Unknown fields are rejected too: a typo such as ``qualty`` would otherwise be silently
ignored by fal and the default ``high`` quality billed. The error names the field it was
probably meant to be (``qualty: Extra inputs are not permitted; did you mean 'quality'?``).

One module to import them from; each concept lives in its own module: the request models and
their field checks, the outputs and handles of a request, and a request's fingerprint (the
identity the submit cache keys on).

Example:
    >>> req = GptImageRequest(prompt="a lighthouse at dawn", quality="low")
    >>> req.endpoint
    'fal-ai/gpt-image-1.5'
    >>> req.to_arguments()["image_size"]
    '1024x1024'
"""

from __future__ import annotations

from prefect_gptimage._fingerprint import (
    request_fingerprint,
    stable_url,
)
from prefect_gptimage._input_refs import (
    InputKind,
    InputSource,
    check_input_ref,
    input_kind,
    split_s3_uri,
)
from prefect_gptimage._output_models import (
    DEFAULT_MAX_BODY_BYTES,
    REQUEST_ID_PATTERN,
    DownloadedImage,
    GenerationResult,
    GptImageOutput,
    ImageFile,
    RequestHandle,
    check_image_count,
    check_request_id,
)
from prefect_gptimage._request_models import (
    CONTENT_TYPES,
    EDIT_ENDPOINT,
    ENDPOINTS,
    INPUT_URL_SCHEMES,
    KNOWN_NAMES_CONTEXT,
    TEXT_TO_IMAGE_ENDPOINT,
    AnyRequest,
    Background,
    EditImageSize,
    GptImageEditRequest,
    GptImageRequest,
    ImageSize,
    InputFidelity,
    OutputFormat,
    Quality,
    check_input_url,
    did_you_mean,
    parse_request,
    request_for_endpoint,
    shorten,
)

__all__ = [
    "CONTENT_TYPES",
    "DEFAULT_MAX_BODY_BYTES",
    "EDIT_ENDPOINT",
    "ENDPOINTS",
    "INPUT_URL_SCHEMES",
    "KNOWN_NAMES_CONTEXT",
    "REQUEST_ID_PATTERN",
    "TEXT_TO_IMAGE_ENDPOINT",
    "AnyRequest",
    "Background",
    "DownloadedImage",
    "EditImageSize",
    "GenerationResult",
    "GptImageEditRequest",
    "GptImageOutput",
    "GptImageRequest",
    "ImageFile",
    "ImageSize",
    "InputFidelity",
    "InputKind",
    "InputSource",
    "OutputFormat",
    "Quality",
    "RequestHandle",
    "check_image_count",
    "check_input_ref",
    "check_input_url",
    "check_request_id",
    "did_you_mean",
    "input_kind",
    "parse_request",
    "request_fingerprint",
    "request_for_endpoint",
    "shorten",
    "split_s3_uri",
    "stable_url",
]
