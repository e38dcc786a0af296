"""prefect-gptimage: Prefect 3 tasks and flows for OpenAI's GPT Image 1.5 on fal.ai.

The public API is re-exported here, once, and loaded on first use: ``fal_client`` reads its
hosts (``FAL_QUEUE_RUN_HOST``, ``FAL_RUN_HOST``) from the environment when it is first imported,
so importing this package must not import it. That lets the bundled emulator
(:mod:`prefect_gptimage.testing`) and the CLI set those variables first.

The layers, bottom up: :mod:`.errors` and :mod:`.schemas`; :mod:`.retry` (what is transient);
:mod:`.fal` (fal's queue and media, no Prefect); :mod:`.tasks` (Prefect tasks); :mod:`.s3` and
:mod:`.reporting` (staging, manifest, artifacts); :mod:`.flows`; :mod:`.cli`.

Example:
    >>> from prefect_gptimage import GptImageRequest, generate_images
    >>> from prefect import flow
    >>> @flow
    ... def make() -> None:
    ...     generate_images(GptImageRequest(prompt="a paper boat", quality="low"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect_gptimage._compat import warn_if_server_unusable
from prefect_gptimage._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
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
    "GptImageError": "errors",
    "InvalidRequestError": "errors",
    "InvalidPromptFile": "errors",
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
    "S3StagingError": "errors",
    "TransientS3StagingError": "errors",
    "PermanentS3StagingError": "errors",
    "BatchIncomplete": "errors",
    "ImageCountMismatch": "errors",
    "DuplicateRequestId": "errors",
    "RetryPolicy": "retry",
    "retry_if_transient": "retry",
    "transient_retries": "retry",
    "estimate_cost": "pricing",
    "GptImageSettings": "settings",
    "FalCredentials": "credentials",
    "FalQueueClient": "fal.client",
    "AsyncFalQueueClient": "fal.async_client",
    "RequestStatus": "fal.polling",
    "MediaPolicy": "fal.media",
    "download_image_file": "fal.media",
    "submit_request": "tasks.queue",
    "asubmit_request": "tasks.queue",
    "wait_for_request": "tasks.queue",
    "fetch_result": "tasks.queue",
    "afetch_result": "tasks.queue",
    "cancel_request": "tasks.queue",
    "acancel_request": "tasks.queue",
    "download_image": "tasks.download",
    "adownload_image": "tasks.download",
    "GenerationOptions": "tasks.generate",
    "generate_images": "tasks.generate",
    "agenerate_images": "tasks.generate",
    "batch_to_s3": "flows",
    "generate_to_s3": "flows",
    "generate_then_edit": "flows",
    "scheduled_content": "flows",
    "ocr_gated_batch": "flows",
    "OcrVerdict": "quality.gate",
    "ocr_check": "quality.gate",
}

__all__ = [
    "EDIT_ENDPOINT",
    "TEXT_TO_IMAGE_ENDPOINT",
    "AsyncFalQueueClient",
    "BatchIncomplete",
    "ConfigurationError",
    "DownloadError",
    "DownloadedImage",
    "DuplicateRequestId",
    "FalCredentials",
    "FalError",
    "FalQueueClient",
    "FalRequestFailed",
    "FalRequestTimeout",
    "GenerationOptions",
    "GenerationResult",
    "GptImageEditRequest",
    "GptImageError",
    "GptImageOutput",
    "GptImageRequest",
    "GptImageSettings",
    "ImageCountMismatch",
    "ImageFile",
    "InvalidPromptFile",
    "InvalidRequestError",
    "MediaPolicy",
    "OcrVerdict",
    "PermanentDownloadError",
    "PermanentFalError",
    "PermanentS3StagingError",
    "RequestHandle",
    "RequestStatus",
    "RetryPolicy",
    "S3StagingError",
    "SubmitOutcomeUnknown",
    "TransientDownloadError",
    "TransientFalError",
    "TransientS3StagingError",
    "__version__",
    "acancel_request",
    "adownload_image",
    "afetch_result",
    "agenerate_images",
    "asubmit_request",
    "batch_to_s3",
    "cancel_request",
    "download_image",
    "download_image_file",
    "estimate_cost",
    "fetch_result",
    "generate_images",
    "generate_then_edit",
    "generate_to_s3",
    "ocr_check",
    "ocr_gated_batch",
    "parse_request",
    "retry_if_transient",
    "scheduled_content",
    "submit_request",
    "transient_retries",
    "wait_for_request",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

# Prefect 3.6 with fastapi 0.137+ cannot serve its API: said once, here (see _compat)
warn_if_server_unusable()


if TYPE_CHECKING:
    from prefect_gptimage.credentials import (
        FalCredentials,
    )
    from prefect_gptimage.errors import (
        BatchIncomplete,
        ConfigurationError,
        DownloadError,
        DuplicateRequestId,
        FalError,
        FalRequestFailed,
        FalRequestTimeout,
        GptImageError,
        ImageCountMismatch,
        InvalidPromptFile,
        InvalidRequestError,
        PermanentDownloadError,
        PermanentFalError,
        PermanentS3StagingError,
        S3StagingError,
        SubmitOutcomeUnknown,
        TransientDownloadError,
        TransientFalError,
        TransientS3StagingError,
    )
    from prefect_gptimage.fal.async_client import (
        AsyncFalQueueClient,
    )
    from prefect_gptimage.fal.client import (
        FalQueueClient,
    )
    from prefect_gptimage.fal.media import (
        MediaPolicy,
        download_image_file,
    )
    from prefect_gptimage.fal.polling import (
        RequestStatus,
    )
    from prefect_gptimage.flows import (
        batch_to_s3,
        generate_then_edit,
        generate_to_s3,
        ocr_gated_batch,
        scheduled_content,
    )
    from prefect_gptimage.pricing import (
        estimate_cost,
    )
    from prefect_gptimage.quality.gate import (
        OcrVerdict,
        ocr_check,
    )
    from prefect_gptimage.retry import (
        RetryPolicy,
        retry_if_transient,
        transient_retries,
    )
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
    from prefect_gptimage.settings import (
        GptImageSettings,
    )
    from prefect_gptimage.tasks.download import (
        adownload_image,
        download_image,
    )
    from prefect_gptimage.tasks.generate import (
        GenerationOptions,
        agenerate_images,
        generate_images,
    )
    from prefect_gptimage.tasks.queue import (
        acancel_request,
        afetch_result,
        asubmit_request,
        cancel_request,
        fetch_result,
        submit_request,
        wait_for_request,
    )
