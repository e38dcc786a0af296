"""``generate_then_edit``: generation composed with a second step through S3.

Generate an image, stage it, hand its presigned URL to ``fal-ai/gpt-image-1.5/edit`` as
``image_urls`` (fal fetches inputs without credentials; presigned URLs work), then stage the
edited result. Each step is cached: a re-run pays for neither (presigned inputs are keyed by the
object, not the signature).

Example:
    >>> generate_then_edit("a quiet harbour at noon", "the same harbour at night, lanterns lit",
    ...                    bucket="my-images", quality="low")
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.client.schemas.objects import State

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.reporting.run_report import RunReport
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.s3 import S3Target, slugify
from prefect_gptimage.schemas import GptImageEditRequest, GptImageRequest, Quality
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.rows import generate_and_stage


@flow(name="gptimage-generate-then-edit", log_prints=False)
def generate_then_edit(
    prompt: str,
    edit_prompt: str,
    bucket: str,
    prefix: str = "gptimage",
    quality: Quality = "low",
    input_fidelity: str = "high",
    output_dir: str | None = None,
    credentials: FalCredentials | None = None,
    timeout: float | None = None,
    presign_expires: int = 3600,
) -> State[RunSummary]:
    """Generate from ``prompt``, then edit that image with ``edit_prompt``; both staged to S3."""
    first = GptImageRequest(prompt=prompt, quality=quality)
    run_key = f"edit-{slugify(prompt, 30)}-{slugify(edit_prompt, 30)}"
    out = Path(output_dir or get_settings().output_dir) / run_key
    target = S3Target(bucket=bucket, prefix=prefix, presign_expires=presign_expires)
    request: GptImageRequest | GptImageEditRequest = first
    with RunReport(out, run_key, target) as report:
        try:
            base = generate_and_stage(first, target, str(out), credentials, timeout)
            report.add(base, first.prompt)
            request = GptImageEditRequest(
                prompt=edit_prompt,
                image_urls=[base.staged[0].url],
                quality=quality,
                input_fidelity=input_fidelity,  # type: ignore[arg-type]
                output_format=first.output_format,
            )
            edited = generate_and_stage(request, target, str(out), credentials, timeout)
            report.add(edited, edit_prompt)
        except Exception as exc:
            report.fail(exc, request)
        return report.close()
