"""Prefect task: download one generated image and verify it (:mod:`prefect_gptimage.fal.media`)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from prefect_gptimage.fal.media import download_image_file
from prefect_gptimage.schemas import AnyRequest, DownloadedImage, ImageFile
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.retry import TRANSIENT_RETRIES

__all__ = ["download_image"]


@task(
    name="gptimage-download",
    cache_policy=NO_CACHE,
    task_run_name="download {request_id}#{index}",
    **TRANSIENT_RETRIES,
)
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
    return download_image_file(
        image,
        dest_dir=output_dir or get_settings().output_dir,
        request_id=request_id,
        endpoint=request.endpoint,
        index=index,
        expected_format=request.output_format,
        expected_size=request.expected_size(),
    )
