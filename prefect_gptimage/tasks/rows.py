"""The per-request unit every pipeline fans out: generate, then stage each image to S3.

One task run per row: submit, wait, fetch, download and upload are plain calls inside it (the
paid ones recorded in the cache as their tasks are), and the run is named after its row
(:func:`row_run_name`: ``row 7: a kite above a beach``), so rows can be told apart in the UI.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, cast

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed
from prefect.tasks import TaskRunNameCallbackWithParameters
from pydantic import BaseModel, Field

from prefect_gptimage.errors import GptImageError
from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.s3 import S3Target, StagedImage, stage_image
from prefect_gptimage.s3.clients import client_from_block, use_s3_client
from prefect_gptimage.schemas import AnyRequest, DownloadedImage, shorten
from prefect_gptimage.tasks.generate import Accepted, generate, paid_for
from prefect_gptimage.tasks.options import GenerationOptions

__all__ = ["ROW_NAME_CHARS", "RowOutcome", "generate_and_stage", "row_label", "row_run_name"]

#: A row's task run name shows at most this many characters of its prompt.
ROW_NAME_CHARS = 40


def row_label(line: int | None, prompt: str) -> str:
    """How a row is named in the UI: ``row 7: a kite above a beach`` (``line`` is 1-based).

    Example:
        >>> row_label(7, "a kite above a beach")
        'row 7: a kite above a beach'
        >>> row_label(None, "a lighthouse on a rocky coast at dawn, in thick fog, oil on canvas")
        'request: a lighthouse on a rocky coast at dawn, in...'
    """
    where = f"row {line}" if line is not None else "request"
    return f"{where}: {shorten(' '.join(prompt.split()), ROW_NAME_CHARS)}"


def _row_run_name(parameters: dict[str, Any]) -> str:
    request = parameters.get("request")
    prompt = getattr(request, "prompt", "") or ""
    return row_label(parameters.get("line"), prompt)


#: The ``task_run_name`` of a row task: Prefect calls it with the run's ``parameters`` (a
#: callable taking ``parameters``); the name is the row's ``line`` and its ``request``'s prompt,
#: see :func:`row_label`. (Typed as Prefect's protocol, whose extra classmethod is Prefect's own
#: test for such callables, which a plain function cannot declare.)
row_run_name = cast(TaskRunNameCallbackWithParameters, _row_run_name)


class RowOutcome(BaseModel):
    """What one request produced: local files, their S3 copies, and whether it was paid now."""

    request_id: str
    request: AnyRequest = Field(description="The request that produced the images.")
    images: list[DownloadedImage]
    staged: list[StagedImage] = Field(default_factory=list)
    from_cache: bool = False
    also_paid: int = Field(
        default=0, ge=0, description="Other requests paid for this row (GenerationResult's)."
    )

    @property
    def paid_requests(self) -> int:
        """Requests this run paid for this row: its own unless cached, plus ``also_paid``."""
        return int(not self.from_cache) + self.also_paid

    @property
    def cost(self) -> float:
        """Estimated USD paid by this run (0 when served from the cache)."""
        return self.paid_requests * estimate_cost(self.request)

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
    task_run_name=row_run_name,
    cache_policy=NO_CACHE,
)
def generate_and_stage(
    request: AnyRequest,
    target: S3Target | None = None,
    options: GenerationOptions | None = None,
    bucket_block: Any = None,
    line: int | None = None,
) -> RowOutcome:
    """Generate one request's images and stage them to ``target`` if given: one task run.

    Every step is a plain call, each retrying its own transient failures; the paid steps
    (submit, fetch) write their cache records the moment they return, under the keys of the
    cached tasks. A re-run finds the paid steps cached, the files on disk and the objects
    already in S3, so it redoes only what failed. ``line``: the row's line in its prompt file,
    for the run's name.

    ``bucket_block`` (a prefect-aws ``S3Bucket``) signs the uploads with its credentials. A row
    running in the flow's own process does not need it (the flow's client reaches its tasks);
    a row on another process, e.g. a Dask worker, does: without it, the worker stages with
    boto3's standard chain (its own ``AWS_*`` settings).
    """
    options = (options or GenerationOptions()).model_copy(update={"download_tasks": False})
    try:
        return _generate_and_stage(request, target, options, bucket_block)
    except GptImageError as exc:
        if options.stop is None or not options.stop.requested:
            raise
        # A stop (a cancel, a signal) ended this row, and the engine has already settled and
        # reported it: the error becomes the task run's Failed state without Prefect logging
        # a traceback for it (to the run's logs in the API). A direct call still raises it and a
        # future's ``state.result(raise_on_failure=False)`` still returns it, as if raised.
        return cast(RowOutcome, Failed(data=exc, message=str(exc)))


def _generate_and_stage(
    request: AnyRequest,
    target: S3Target | None,
    options: GenerationOptions,
    bucket_block: Any,
) -> RowOutcome:
    result = generate(request, options)
    staged: list[StagedImage] = []
    if target is not None:
        client = client_from_block(bucket_block) if bucket_block is not None else None
        accepted = Accepted()
        accepted.note(result.handle, cached=result.from_cache)
        with (
            paid_for(accepted),  # a staging failure keeps the request paid for, with its id
            use_s3_client(client) if client is not None else nullcontext(),
        ):
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
        also_paid=result.also_paid,
    )
