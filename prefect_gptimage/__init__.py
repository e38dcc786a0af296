"""prefect-gptimage: Prefect 3 tasks and flows for OpenAI's GPT Image 1.5 on fal.ai.

The public API is re-exported here, loaded on first use: ``fal_client`` reads its hosts
(``FAL_QUEUE_RUN_HOST``, ``FAL_RUN_HOST``) from the environment when it is first imported, so
importing this package must not import it. That lets the bundled emulator
(:mod:`prefect_gptimage.testing`) and the CLI set those variables first.

Example:
    >>> from prefect_gptimage import GptImageRequest, generate_images
    >>> from prefect import flow
    >>> @flow
    ... def make() -> None:
    ...     generate_images(GptImageRequest(prompt="a paper boat", quality="low"))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # schemas
    "GptImageRequest": "schemas",
    "GptImageEditRequest": "schemas",
    "GptImageOutput": "schemas",
    "ImageFile": "schemas",
    "RequestHandle": "schemas",
    "DownloadedImage": "schemas",
    "GenerationResult": "schemas",
    "parse_request": "schemas",
    "TEXT_TO_IMAGE_ENDPOINT": "schemas",
    "EDIT_ENDPOINT": "schemas",
    # errors
    "GptImageError": "errors",
    "InvalidRequestError": "errors",
    "ConfigurationError": "errors",
    "FalError": "errors",
    "TransientFalError": "errors",
    "PermanentFalError": "errors",
    "FalRequestFailed": "errors",
    "FalRequestTimeout": "errors",
    "SubmitOutcomeUnknown": "errors",
    "DownloadError": "errors",
    "TransientDownloadError": "errors",
    "PermanentDownloadError": "errors",
    # pricing and settings
    "estimate_cost": "pricing",
    "GptImageSettings": "settings",
    # client layer
    "FalQueueClient": "fal.client",
    "AsyncFalQueueClient": "fal.async_client",
    "RetryPolicy": "fal.client",
    "RequestStatus": "fal.polling",
    "FalCredentials": "credentials",
    "download_image_file": "fal.media",
    # tasks
    "submit_request": "tasks.queue",
    "wait_for_request": "tasks.queue",
    "fetch_result": "tasks.queue",
    "download_image": "tasks.download",
    "cancel_request": "tasks.queue",
    "generate_images": "tasks.generate",
    "retry_if_transient": "tasks.retry",
}

__all__ = [
    "EDIT_ENDPOINT",
    "TEXT_TO_IMAGE_ENDPOINT",
    "AsyncFalQueueClient",
    "ConfigurationError",
    "DownloadError",
    "DownloadedImage",
    "FalCredentials",
    "FalError",
    "FalQueueClient",
    "FalRequestFailed",
    "FalRequestTimeout",
    "GenerationResult",
    "GptImageEditRequest",
    "GptImageError",
    "GptImageOutput",
    "GptImageRequest",
    "GptImageSettings",
    "ImageFile",
    "InvalidRequestError",
    "PermanentDownloadError",
    "PermanentFalError",
    "RequestHandle",
    "RequestStatus",
    "RetryPolicy",
    "SubmitOutcomeUnknown",
    "TransientDownloadError",
    "TransientFalError",
    "__version__",
    "cancel_request",
    "download_image",
    "download_image_file",
    "estimate_cost",
    "fetch_result",
    "generate_images",
    "parse_request",
    "retry_if_transient",
    "submit_request",
    "wait_for_request",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prefect_gptimage' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"prefect_gptimage.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from prefect_gptimage.credentials import FalCredentials
    from prefect_gptimage.errors import (
        ConfigurationError,
        DownloadError,
        FalError,
        FalRequestFailed,
        FalRequestTimeout,
        GptImageError,
        InvalidRequestError,
        PermanentDownloadError,
        PermanentFalError,
        SubmitOutcomeUnknown,
        TransientDownloadError,
        TransientFalError,
    )
    from prefect_gptimage.fal.async_client import AsyncFalQueueClient
    from prefect_gptimage.fal.client import FalQueueClient, RetryPolicy
    from prefect_gptimage.fal.media import download_image_file
    from prefect_gptimage.fal.polling import RequestStatus
    from prefect_gptimage.pricing import estimate_cost
    from prefect_gptimage.schemas import (
        EDIT_ENDPOINT,
        TEXT_TO_IMAGE_ENDPOINT,
        DownloadedImage,
        GenerationResult,
        GptImageEditRequest,
        GptImageOutput,
        GptImageRequest,
        ImageFile,
        RequestHandle,
        parse_request,
    )
    from prefect_gptimage.settings import GptImageSettings
    from prefect_gptimage.tasks.download import download_image
    from prefect_gptimage.tasks.generate import generate_images
    from prefect_gptimage.tasks.queue import (
        cancel_request,
        fetch_result,
        submit_request,
        wait_for_request,
    )
    from prefect_gptimage.tasks.retry import retry_if_transient
