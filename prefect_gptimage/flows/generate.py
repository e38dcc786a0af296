"""``generate_to_s3``: one request (a prompt, or an edit), N images, to a folder and to S3.

Example:
    >>> from prefect_gptimage import GptImageRequest
    >>> generate_to_s3(GptImageRequest(prompt="a lighthouse", quality="low"), bucket="my-images")

``bucket`` is a bucket name or a prefect-aws ``S3Bucket`` block (``S3Bucket.load("images")``):
its folder is the key prefix unless ``prefix`` is given, and its credentials sign the uploads.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.client.schemas.objects import State
from prefect_aws import S3Bucket

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.flows._preflight import preflight_bucket
from prefect_gptimage.reporting.run_report import RunReport
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.s3 import slugify
from prefect_gptimage.s3.clients import use_s3_client
from prefect_gptimage.schemas import GptImageEditRequest, GptImageRequest
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.cache import request_fingerprint
from prefect_gptimage.tasks.options import GenerationOptions
from prefect_gptimage.tasks.rows import generate_and_stage


@flow(name="gptimage-generate-to-s3", log_prints=False)
def generate_to_s3(
    request: GptImageRequest | GptImageEditRequest,
    bucket: str | S3Bucket | None = None,
    prefix: str | None = None,
    output_dir: str | None = None,
    credentials: FalCredentials | None = None,
    timeout: float | None = None,
    refresh: bool = False,
    variant: int = 0,
    presign_expires: int = 86400,
    run_key: str | None = None,
    resubmit_unknown: bool = False,
) -> State[RunSummary]:
    """Generate the images of one request into ``output_dir``; stage them to ``bucket`` if given.

    The run writes a manifest and an HTML gallery beside the images, and (with a bucket) stages
    the manifest and publishes the results table and gallery artifacts. ``prefix`` defaults to
    the ``S3Bucket`` block's folder, else ``gptimage``.

    Before submitting, the bucket name must be valid, the bucket must take a write and the fal
    host must be an allowed media host; otherwise one error is raised and nothing is paid.

    If an earlier submit of this request may have been billed without its answer being stored,
    the run fails "outcome unknown, possibly billed" and pays nothing, unless ``resubmit_unknown``.
    """
    fingerprint = request_fingerprint(request, variant)[:10]
    run_key = run_key or f"generate-{slugify(request.prompt, 40)}-{fingerprint}"
    out = Path(output_dir or get_settings().output_dir) / run_key
    target, s3_client = preflight_bucket(bucket, prefix, presign_expires=presign_expires)
    with use_s3_client(s3_client), RunReport(out, run_key, target) as report:
        try:
            options = GenerationOptions(
                credentials=credentials,
                output_dir=str(out),
                timeout=timeout,
                refresh_cache=refresh,
                resubmit_unknown=resubmit_unknown,
                variant=variant,
            )
            outcome = generate_and_stage(request, target, options)
        except Exception as exc:
            report.fail(exc, request)
        else:
            report.add(outcome, request.prompt)
        return report.close()
