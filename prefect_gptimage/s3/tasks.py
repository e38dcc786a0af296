"""Prefect tasks for S3 staging: thin wrappers over :mod:`prefect_gptimage.s3.staging`.

They add what Prefect contributes and nothing else: a task run in the UI, and no result caching
(an upload must happen when asked; idempotency comes from the deterministic key and the SHA-256
check in :func:`~prefect_gptimage.s3.staging.stage_image`). They add no Prefect retries: the
staging functions retry their own transient failures, under the package's one
:class:`~prefect_gptimage.retry.RetryPolicy` and budget (``PREFECT_GPTIMAGE_RETRY_BUDGET``, the
same as fal's), over clients that make one HTTP try per call. One layer, one budget, whether
the functions are called plainly or through these tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from prefect_gptimage.retry import RetryPolicy
from prefect_gptimage.s3.clients import ClientSource
from prefect_gptimage.s3.keys import manifest_key
from prefect_gptimage.s3.models import S3Target, StagedFile, StagedImage
from prefect_gptimage.s3.staging import MANIFEST_CONTENT_TYPE, stage_file, stage_image
from prefect_gptimage.schemas import AnyRequest, DownloadedImage

__all__ = ["stage_image_task", "stage_manifest_task"]

#: Never cached; no Prefect retries (the staging call retries within the budget itself).
_STAGING_TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE}


@task(name="gptimage-stage-image", **_STAGING_TASK_OPTIONS)
def stage_image_task(
    image: DownloadedImage,
    prompt: str,
    request: AnyRequest,
    target: S3Target,
    client: ClientSource = None,
    retry: RetryPolicy | None = None,
) -> StagedImage:
    """Prefect task around :func:`stage_image` (which retries transient failures in budget).

    Example:
        >>> @flow  # doctest: +SKIP
        ... def publish(images, request):
        ...     target = S3Target(bucket="my-images")
        ...     return [stage_image_task(i, request.prompt, request, target) for i in images]
    """
    return stage_image(
        image, prompt=prompt, request=request, target=target, client=client, retry=retry
    )


@task(name="gptimage-stage-manifest", **_STAGING_TASK_OPTIONS)
def stage_manifest_task(
    path: str,
    run_key: str,
    target: S3Target,
    client: ClientSource = None,
    retry: RetryPolicy | None = None,
) -> StagedFile:
    """Prefect task: upload a JSONL manifest to ``{prefix}/manifests/{run_key}.jsonl``.

    Example:
        >>> staged = stage_manifest_task("out/run.jsonl", "nightly-1", target)  # doctest: +SKIP
        >>> staged.s3_uri  # doctest: +SKIP
        's3://my-images/gptimage/manifests/nightly-1.jsonl'
    """
    return stage_file(
        Path(path), manifest_key(target, run_key), MANIFEST_CONTENT_TYPE, target, client, retry
    )
