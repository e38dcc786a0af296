"""``scheduled_content``: a templated prompt filled with the run date, idempotent per date.

The template may use ``{date}`` (ISO, e.g. 2026-11-24), ``{weekday}`` and ``{month}``. The date
is the flow run's scheduled date (or ``date`` when given), so a re-run of the same day builds the
same request, hits the cache, and pays nothing.

Example:
    >>> scheduled_content("A poster for {weekday}, {date}: autumn in the city", bucket="my-images")
"""

from __future__ import annotations

import datetime as dt

from prefect import flow, runtime
from prefect.client.schemas.objects import State
from prefect_aws import S3Bucket

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.errors import InvalidRequestError
from prefect_gptimage.flows._preflight import bucket_name, check_fal_media_host
from prefect_gptimage.flows.generate import generate_to_s3
from prefect_gptimage.reporting.run_report import finish
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.s3.preflight import validate_bucket_name
from prefect_gptimage.schemas import ImageSize, OutputFormat, Quality, parse_request


def run_date(date: str | None = None) -> dt.date:
    """``date`` if given, else the flow run's scheduled start (else today), as a date."""
    if date:
        return dt.date.fromisoformat(date)
    scheduled = runtime.flow_run.scheduled_start_time
    return scheduled.date() if scheduled else dt.date.today()


def fill_template(template: str, day: dt.date) -> str:
    """Fill ``{date}``, ``{weekday}`` and ``{month}``; any other placeholder is an error."""
    try:
        return template.format(
            date=day.isoformat(), weekday=day.strftime("%A"), month=day.strftime("%B")
        )
    except (KeyError, IndexError, ValueError) as exc:
        raise InvalidRequestError("template", f"unknown placeholder or bad format: {exc}") from None


@flow(name="gptimage-scheduled-content", log_prints=False)
def scheduled_content(
    template: str,
    bucket: str | S3Bucket | None = None,
    prefix: str | None = None,
    date: str | None = None,
    quality: Quality = "low",
    image_size: ImageSize = "1024x1024",
    num_images: int = 1,
    output_format: OutputFormat = "png",
    output_dir: str | None = None,
    credentials: FalCredentials | None = None,
) -> State[RunSummary]:
    """Generate the day's images from ``template`` and stage them under ``{prefix}/``.

    ``bucket`` is a bucket name or a prefect-aws ``S3Bucket`` block; ``prefix`` defaults to the
    block's folder, else ``scheduled``. The bucket name and the fal media host are checked here,
    before the template is even filled; ``generate_to_s3`` then probes the bucket with a write
    before its submit.
    """
    check_fal_media_host()
    name = bucket_name(bucket)
    if name is not None:
        validate_bucket_name(name)
    day = run_date(date)
    request = parse_request(
        {
            "prompt": fill_template(template, day),
            "quality": quality,
            "image_size": image_size,
            "num_images": num_images,
            "output_format": output_format,
        }
    )
    if prefix is None and (bucket is None or isinstance(bucket, str) or not bucket.bucket_folder):
        prefix = "scheduled"
    state = generate_to_s3(
        request,
        bucket=bucket,
        prefix=prefix,
        output_dir=output_dir,
        credentials=credentials,
        run_key=f"scheduled-{day.isoformat()}",
        return_state=True,
    )
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, BaseException):
        raise summary
    return finish(summary)  # type: ignore[arg-type]
