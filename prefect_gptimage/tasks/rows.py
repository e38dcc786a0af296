"""The per-request unit every pipeline fans out: generate, then stage each image to S3."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.s3 import S3Target, StagedImage, stage_image
from prefect_gptimage.schemas import AnyRequest, DownloadedImage
from prefect_gptimage.tasks.generate import generate
from prefect_gptimage.tasks.retry import TRANSIENT_RETRIES


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
    **TRANSIENT_RETRIES,
)
def generate_and_stage(
    request: AnyRequest,
    target: S3Target | None = None,
    output_dir: str | None = None,
    credentials: FalCredentials | None = None,
    timeout: float | None = None,
    refresh: bool = False,
    variant: int = 0,
    max_in_flight: int | None = None,
) -> RowOutcome:
    """Generate one request's images and stage them to ``target`` if given.

    Only the paid steps (submit, fetch) run as their own cached tasks; downloads and uploads are
    plain calls, and this task retries transient failures: a retry finds the paid steps cached,
    the files on disk and the objects already in S3, so it redoes only what failed.
    """
    result = generate(
        request,
        credentials=credentials,
        output_dir=output_dir,
        timeout=timeout,
        refresh_cache=refresh,
        variant=variant,
        download_tasks=False,
        max_in_flight=max_in_flight,
    )
    staged = (
        [
            stage_image(image, prompt=request.prompt, request=request, target=target)
            for image in result.images
        ]
        if target is not None
        else []
    )
    return RowOutcome(
        request_id=result.handle.request_id,
        request=request,
        images=result.images,
        staged=staged,
        from_cache=result.from_cache,
    )
