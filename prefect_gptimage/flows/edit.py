"""``generate_then_edit``: generation composed with a second step through S3.

Generate an image, stage it, hand its presigned URL to ``fal-ai/gpt-image-1.5/edit`` as
``image_urls`` (fal fetches inputs without credentials; presigned URLs work), then stage the
edited result. Each step is cached: a re-run pays for neither (presigned inputs are keyed by the
object, not the signature). ``bucket`` is a bucket name or a prefect-aws ``S3Bucket`` block.

Example:
    >>> generate_then_edit("a quiet harbour at noon", "the same harbour at night, lanterns lit",
    ...                    bucket="my-images", quality="low")
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.client.schemas.objects import State
from prefect_aws import S3Bucket

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.errors import InvalidRequestError
from prefect_gptimage.flows._preflight import bucket_name, preflight_bucket
from prefect_gptimage.ledger import RequestIdLedger, use_request_id_ledger
from prefect_gptimage.reporting.run_report import RunReport
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.s3 import slugify
from prefect_gptimage.s3.clients import use_s3_client
from prefect_gptimage.schemas import (
    GptImageEditRequest,
    GptImageRequest,
    InputFidelity,
    Quality,
)
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.options import GenerationOptions
from prefect_gptimage.tasks.rows import generate_and_stage


@flow(name="gptimage-generate-then-edit", log_prints=False)
def generate_then_edit(
    prompt: str,
    edit_prompt: str,
    bucket: str | S3Bucket,
    prefix: str | None = None,
    quality: Quality = "low",
    input_fidelity: InputFidelity = "high",
    output_dir: str | None = None,
    credentials: FalCredentials | None = None,
    timeout: float | None = None,
    presign_expires: int = 3600,
) -> State[RunSummary]:
    """Generate from ``prompt``, then edit that image with ``edit_prompt``; both staged to S3.

    ``prefix`` defaults to the ``S3Bucket`` block's folder, else ``gptimage``. Before the first
    submit the bucket name must be valid, the bucket must take a write and the fal host must be
    an allowed media host; otherwise one error is raised and nothing is paid.
    """
    first = GptImageRequest(prompt=prompt, quality=quality)
    run_key = f"edit-{slugify(prompt, 30)}-{slugify(edit_prompt, 30)}"
    out = Path(output_dir or get_settings().output_dir) / run_key
    if bucket_name(bucket) is None:
        raise InvalidRequestError(
            "bucket", "generate_then_edit needs a bucket: the edit reads the image from S3"
        )
    target, s3_client = preflight_bucket(bucket, prefix, presign_expires=presign_expires)
    assert target is not None
    request: GptImageRequest | GptImageEditRequest = first
    options = GenerationOptions(credentials=credentials, output_dir=str(out), timeout=timeout)
    with (
        use_s3_client(s3_client),
        use_request_id_ledger(RequestIdLedger()),
        RunReport(out, run_key, target) as report,
    ):
        try:
            base = generate_and_stage(first, target, options)
            report.add(base, first.prompt)
            request = GptImageEditRequest(
                prompt=edit_prompt,
                image_urls=[base.staged[0].url],
                quality=quality,
                input_fidelity=input_fidelity,
                output_format=first.output_format,
            )
            edited = generate_and_stage(request, target, options)
            report.add(edited, edit_prompt)
        except Exception as exc:
            report.fail(exc, request)
        return report.close()
