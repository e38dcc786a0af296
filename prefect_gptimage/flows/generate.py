"""``generate_flow``: one request (a prompt, or an edit), N images, written to a local folder.

Example:
    >>> from prefect_gptimage import GptImageRequest
    >>> summary = generate_flow(GptImageRequest(prompt="a lighthouse", quality="low"))
    >>> summary.images[0]["path"]
"""

from __future__ import annotations

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.flows.summary import Failure, RunSummary
from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.schemas import GptImageEditRequest, GptImageRequest
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks import generate_images


def finish(summary: RunSummary) -> State[RunSummary]:
    """The flow's final state: Failed (carrying the summary) when any image failed."""
    if summary.ok:
        return Completed(data=summary)
    return Failed(message=f"{len(summary.failures)} request(s) failed", data=summary)


@flow(name="gptimage-generate", log_prints=False)
def generate_flow(
    request: GptImageRequest | GptImageEditRequest,
    output_dir: str | None = None,
    credentials: FalCredentials | None = None,
    timeout: float | None = None,
    refresh: bool = False,
    variant: int = 0,
) -> State[RunSummary]:
    """Generate the images of one request into ``output_dir`` (default ``gptimage-output``)."""
    summary = RunSummary()
    try:
        result = generate_images(
            request,
            credentials=credentials,
            output_dir=output_dir or get_settings().output_dir,
            timeout=timeout,
            refresh_cache=refresh,
            variant=variant,
        )
    except Exception as exc:
        summary.failures.append(
            Failure.from_exception(exc, request.to_arguments(), request.endpoint)
        )
        return finish(summary)
    summary.images = [img.model_dump() for img in result.images]
    if not result.from_cache:
        summary.submitted = 1
        summary.estimated_cost_usd = estimate_cost(result.request)
    return finish(summary)
