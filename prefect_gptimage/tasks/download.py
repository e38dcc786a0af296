"""Prefect tasks: download one generated image and verify it (:mod:`prefect_gptimage.fal.media`).

The download retries its own transient failures (the one retry layer), so the tasks have no
Prefect retries. :func:`adownload_image` runs the same download in a worker thread
(:mod:`._twin`), so an async flow overlaps many downloads without blocking its event loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from prefect_gptimage.fal.media import download_image_file
from prefect_gptimage.schemas import AnyRequest, DownloadedImage, ImageFile
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks._twin import async_twin
from prefect_gptimage.tasks.policies import media_policy, retry_policy

__all__ = ["adownload_image", "download_image"]

DOWNLOAD_OPTIONS: dict[str, Any] = {
    "name": "gptimage-download",
    "task_run_name": "download {request_id}#{index}",
    "cache_policy": NO_CACHE,
}


def download(
    image: ImageFile,
    request: AnyRequest,
    request_id: str,
    index: int = 0,
    output_dir: str | Path | None = None,
) -> DownloadedImage:
    """Download one image of ``request`` to ``output_dir`` (default: the settings'), verified."""
    return download_image_file(
        image,
        dest_dir=output_dir or get_settings().output_dir,
        request_id=request_id,
        endpoint=request.endpoint,
        index=index,
        expected_format=request.output_format,
        expected_size=request.expected_size(),
        policy=media_policy(),
        retry=retry_policy(),
    )


@task(**DOWNLOAD_OPTIONS)
def download_image(
    image: ImageFile,
    request: AnyRequest,
    request_id: str,
    index: int = 0,
    output_dir: str | None = None,
) -> DownloadedImage:
    """Stream one image to ``output_dir``, check it decodes as promised, record its sha256.

    Example:
        >>> files = [download_image(img, request, handle.request_id, i)
        ...          for i, img in enumerate(output.images)]
    """
    return download(image, request, request_id, index, output_dir)


adownload_image = task(**DOWNLOAD_OPTIONS)(async_twin(download_image.fn))
