"""The per-request unit every pipeline fans out: generate, then stage each image to S3."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.s3 import S3Target, StagedImage, stage_image
from prefect_gptimage.s3.clients import client_from_block, use_s3_client
from prefect_gptimage.schemas import AnyRequest, DownloadedImage
from prefect_gptimage.tasks.generate import GenerationOptions, generate


class RowOutcome(BaseModel):
    """What one request produced: local files, their S3 copies, and whether it was paid now."""

    request_id: str
    request: AnyRequest = Field(description="The request that produced the images.")
    images: list[DownloadedImage]
    staged: list[StagedImage] = Field(default_factory=list)
    from_cache: bool = False

    @property
    def cost(self) -> float:
        """Estimated USD paid by this run (0 when served from the cache)."""
        return 0.0 if self.from_cache else estimate_cost(self.request)

    def image_records(self) -> list[dict[str, Any]]:
        """One dict per image for the run summary (S3 URI and link when staged)."""
        if self.staged:
            return [
                s.model_dump(mode="json") | {"path": i.path}
                for s, i in zip(self.staged, self.images, strict=True)
            ]
        return [i.model_dump(mode="json") for i in self.images]


@task(
    name="gptimage-generate-and-stage",
    task_run_name="row: {request.endpoint}",
    cache_policy=NO_CACHE,
)
def generate_and_stage(
    request: AnyRequest,
    target: S3Target | None = None,
    options: GenerationOptions | None = None,
    bucket_block: Any = None,
) -> RowOutcome:
    """Generate one request's images and stage them to ``target`` if given.

    Only the paid steps (submit, fetch) run as their own cached tasks; downloads and uploads are
    plain calls, each retrying its own transient failures. A re-run finds the paid steps cached,
    the files on disk and the objects already in S3, so it redoes only what failed.

    ``bucket_block`` (a prefect-aws ``S3Bucket``) signs the uploads with its credentials. A row
    running in the flow's own process does not need it (the flow's client reaches its tasks);
    a row on another process, e.g. a Dask worker, does: without it, the worker stages with
    boto3's standard chain (its own ``AWS_*`` settings).
    """
    options = (options or GenerationOptions()).model_copy(update={"download_tasks": False})
    result = generate(request, options)
    staged: list[StagedImage] = []
    if target is not None:
        client = client_from_block(bucket_block) if bucket_block is not None else None
        with use_s3_client(client) if client is not None else nullcontext():
            staged = [
                stage_image(image, prompt=request.prompt, request=request, target=target)
                for image in result.images
            ]
    return RowOutcome(
        request_id=result.handle.request_id,
        request=request,
        images=result.images,
        staged=staged,
        from_cache=result.from_cache,
    )
