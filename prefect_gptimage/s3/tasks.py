"""Prefect tasks for S3 staging: thin wrappers over :mod:`prefect_gptimage.s3.staging`.

They add what Prefect contributes and nothing else: 3 retries with exponential backoff (1, 2, 4 s,
jittered) for transient failures only (:func:`~prefect_gptimage.retry.transient_retries`),
and no result caching (an upload must happen when asked; idempotency comes from the deterministic
key and the SHA-256 check in :func:`~prefect_gptimage.s3.staging.stage_image`). The retries are the
task's one layer: with no ``client`` given, the task's S3 client has botocore's own retries off.
A plain call of the staging functions retries in botocore instead (its standard mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from prefect_gptimage.retry import transient_retries
from prefect_gptimage.s3.clients import ClientSource, resolve_client
from prefect_gptimage.s3.keys import manifest_key
from prefect_gptimage.s3.models import S3Target, StagedFile, StagedImage
from prefect_gptimage.s3.staging import MANIFEST_CONTENT_TYPE, stage_file, stage_image
from prefect_gptimage.schemas import AnyRequest, DownloadedImage

__all__ = ["stage_image_task", "stage_manifest_task"]

#: 3 retries, 1 s, 2 s, 4 s (plus up to 50% jitter), transient failures only; never cached.
_STAGING_TASK_OPTIONS: dict[str, Any] = transient_retries(3) | {"cache_policy": NO_CACHE}


def _one_try(client: ClientSource) -> ClientSource:
    """The task retries, so the default client must not (botocore ``max_attempts=1``)."""
    return resolve_client(client, max_attempts=1) if client is None else client


@task(name="gptimage-stage-image", **_STAGING_TASK_OPTIONS)
def stage_image_task(
    image: DownloadedImage,
    prompt: str,
    request: AnyRequest,
    target: S3Target,
    client: ClientSource = None,
) -> StagedImage:
    """Prefect task around :func:`stage_image`: 3 retries (1, 2, 4 s, jittered), transient only.

    Example:
        >>> @flow  # doctest: +SKIP
        ... def publish(images, request):
        ...     target = S3Target(bucket="my-images")
        ...     return [stage_image_task(i, request.prompt, request, target) for i in images]
    """
    return stage_image(
        image, prompt=prompt, request=request, target=target, client=_one_try(client)
    )


@task(name="gptimage-stage-manifest", **_STAGING_TASK_OPTIONS)
def stage_manifest_task(
    path: str,
    run_key: str,
    target: S3Target,
    client: ClientSource = None,
) -> StagedFile:
    """Prefect task: upload a JSONL manifest to ``{prefix}/manifests/{run_key}.jsonl``.

    Example:
        >>> staged = stage_manifest_task("out/run.jsonl", "nightly-1", target)  # doctest: +SKIP
        >>> staged.s3_uri  # doctest: +SKIP
        's3://my-images/gptimage/manifests/nightly-1.jsonl'
    """
    return stage_file(
        Path(path), manifest_key(target, run_key), MANIFEST_CONTENT_TYPE, target, _one_try(client)
    )
