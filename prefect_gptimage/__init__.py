"""prefect-gptimage: Prefect 3 tasks and flows for OpenAI's GPT Image 1.5 on fal.ai.

The names most flows need are here, in prefect-aws's style: the request models and what a
request returns, the ``FalCredentials`` block, the reusable tasks (each with its async twin), the
ready-made flows and the base of every error. Everything else is public in its own module:
the exception tree in :mod:`prefect_gptimage.errors`, the models in :mod:`.schemas`, the retry
table in :mod:`.retry`, the fal clients in :mod:`.fal`, staging in :mod:`.s3`, the other flows in
:mod:`.flows`, and so on (README, "Layout", lists the layers).

Names load on first use: ``fal_client`` reads its hosts (``FAL_QUEUE_RUN_HOST``,
``FAL_RUN_HOST``) from the environment when it is first imported, so importing this package must
not import it. That lets the bundled emulator (:mod:`prefect_gptimage.testing`) and the CLI set
those variables first.

Example:
    >>> from prefect_gptimage import GptImageRequest, generate_images
    >>> from prefect import flow
    >>> @flow
    ... def make() -> None:
    ...     generate_images(GptImageRequest(prompt="a paper boat", quality="low"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect_gptimage._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # what a request is, and what it gives back
    "GptImageRequest": "schemas",
    "GptImageEditRequest": "schemas",
    "RequestHandle": "schemas",
    "GenerationResult": "schemas",
    "GenerationOptions": "tasks.options",
    # the fal key, as a Prefect block
    "FalCredentials": "credentials",
    # the reusable tasks and their async twins
    "submit_request": "tasks.queue",
    "asubmit_request": "tasks.queue",
    "wait_for_request": "tasks.queue",
    "fetch_result": "tasks.queue",
    "afetch_result": "tasks.queue",
    "cancel_request": "tasks.queue",
    "acancel_request": "tasks.queue",
    "download_image": "tasks.download",
    "adownload_image": "tasks.download",
    "generate_images": "tasks.generate",
    "agenerate_images": "tasks.generate",
    # the flows
    "batch_to_s3": "flows",
    "generate_to_s3": "flows",
    "ocr_gated_batch": "flows",
    # errors: the base of all, and what a plain call of batch_to_s3 raises
    "GptImageError": "errors",
    "BatchIncomplete": "errors",
}

__all__ = [
    "BatchIncomplete",
    "FalCredentials",
    "GenerationOptions",
    "GenerationResult",
    "GptImageEditRequest",
    "GptImageError",
    "GptImageRequest",
    "RequestHandle",
    "__version__",
    "acancel_request",
    "adownload_image",
    "afetch_result",
    "agenerate_images",
    "asubmit_request",
    "batch_to_s3",
    "cancel_request",
    "download_image",
    "fetch_result",
    "generate_images",
    "generate_to_s3",
    "ocr_gated_batch",
    "submit_request",
    "wait_for_request",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from prefect_gptimage.credentials import FalCredentials
    from prefect_gptimage.errors import BatchIncomplete, GptImageError
    from prefect_gptimage.flows import batch_to_s3, generate_to_s3, ocr_gated_batch
    from prefect_gptimage.schemas import (
        GenerationResult,
        GptImageEditRequest,
        GptImageRequest,
        RequestHandle,
    )
    from prefect_gptimage.tasks.download import adownload_image, download_image
    from prefect_gptimage.tasks.generate import agenerate_images, generate_images
    from prefect_gptimage.tasks.options import GenerationOptions
    from prefect_gptimage.tasks.queue import (
        acancel_request,
        afetch_result,
        asubmit_request,
        cancel_request,
        fetch_result,
        submit_request,
        wait_for_request,
    )
