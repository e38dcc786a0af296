"""``edit_folder_to_s3``: every image under a local folder or an S3 prefix, edited with one prompt.

One row per source image (PNG, JPEG or WebP by name, found recursively, in sorted order), each
an edit of that image with the same prompt and options, run on the same row engine as
``batch_to_s3`` (:func:`~prefect_gptimage.flows._row_batch.run_rows`: window, budget, stop,
resume, manifest, gallery, artifacts, events). Every source is read, checked and staged (under
``<prefix>/inputs/<sha256>.<ext>`` in the output bucket) before anything is paid; the request's
identity is the source's sha256, so a re-run, or the same photo under another name, pays
nothing. Each manifest line names its source and sha256, and each edited image's asset has its
source as upstream asset (``s3://`` or ``file://``).

``source`` is a folder (``/data/products``, relative to the working directory) or
``s3://bucket/prefix/``, listed with the user's own AWS credentials. ``mask`` (a local path or
``s3://`` URI) applies to every image: it must be each image's size.

Example:
    >>> summary = edit_folder_to_s3("s3://photos/products/", "on a plain white background",
    ...                             bucket="edited", quality="low")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.logging import get_run_logger
from prefect_aws import S3Bucket

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.engine.options import RunOptions
from prefect_gptimage.engine.stop import Stop
from prefect_gptimage.errors import InputImageError, InvalidRequestError
from prefect_gptimage.flows._edit_inputs import prepare_inputs, warn_retention
from prefect_gptimage.flows._preflight import check_budget, check_lock_service, preflight_bucket
from prefect_gptimage.flows._row_batch import run_rows
from prefect_gptimage.prompts import PromptRow, unique_rows
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.s3.keys import slugify
from prefect_gptimage.schemas import input_kind, parse_request, split_s3_uri

__all__ = ["IMAGE_SUFFIXES", "edit_folder_to_s3", "list_sources"]

#: File names taken as source images (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def list_sources(source: str, s3_client: Any = None) -> list[str]:
    """The images under ``source`` (a folder or ``s3://bucket/prefix/``), sorted: absolute
    paths or ``s3://`` URIs. An empty or missing source is an :class:`InputImageError`."""
    if input_kind(source) == "s3" or source.lower().startswith("s3://"):
        found = _list_s3(source, s3_client)
    else:
        folder = Path(source).expanduser().absolute()
        if not folder.is_dir():
            raise InputImageError("source", str(folder), "no such folder")
        found = sorted(
            os.path.normpath(p)
            for p in folder.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
        )
    if not found:
        raise InputImageError(
            "source", source, f"no image ({', '.join(IMAGE_SUFFIXES)}) found under it"
        )
    return found


def _list_s3(source: str, client: Any) -> list[str]:
    """Every image object under ``s3://bucket/prefix`` (the user's boto3 chain)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from prefect_gptimage.s3.clients import get_s3_client

    bucket, _, prefix = source[len("s3://") :].partition("/")
    if not bucket:
        raise InputImageError("source", source, "an S3 source needs a bucket: s3://bucket/prefix/")
    s3 = client or get_s3_client()
    keys: list[str] = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(
                o["Key"]
                for o in page.get("Contents", [])
                if o["Key"].lower().endswith(IMAGE_SUFFIXES) and not o["Key"].endswith("/")
            )
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        raise InputImageError("source", source, f"cannot list it ({code or exc})") from None
    except BotoCoreError as exc:
        raise InputImageError("source", source, f"cannot list it ({exc})") from None
    for key in keys:
        split_s3_uri(f"s3://{bucket}/{key}")
    return [f"s3://{bucket}/{key}" for key in sorted(keys)]


def edit_rows(
    sources: list[str], prompt: str, fields: dict[str, Any], mask: str | None = None
) -> list[PromptRow]:
    """One edit row per source (``line``: its 1-based position), validated."""
    rows = []
    for line, ref in enumerate(sources, start=1):
        request = parse_request(
            {**fields, "prompt": prompt, "image_urls": [ref], "mask_image_url": mask}
        )
        rows.append(PromptRow(line=line, request=request))
    return rows


def edit_run_key(source: str, prompt: str, fields: dict[str, Any], mask: str | None) -> str:
    """A deterministic name for the run: the source's slug and a hash of what is asked."""
    asked = json.dumps({"s": source, "p": prompt, "f": fields, "m": mask}, sort_keys=True)
    digest = hashlib.sha256(asked.encode()).hexdigest()[:10]
    name = source.rstrip("/").rsplit("/", 1)[-1] or "source"
    return f"edit-{slugify(name, 40, default='images')}-{digest}"


@flow(name="gptimage-edit-folder-to-s3", log_prints=False)
def edit_folder_to_s3(
    source: str,
    prompt: str,
    bucket: str | S3Bucket | None = None,
    prefix: str | None = None,
    mask: str | None = None,
    options: dict[str, Any] | None = None,
    concurrency: int = 8,
    output_dir: str | None = None,
    max_cost: float | None = None,
    dry_run: bool = False,
    timeout: float | None = None,
    refresh: bool = False,
    presign_expires: int = 86400,
    credentials: FalCredentials | None = None,
    resubmit_unknown: bool = False,
    lookahead: int | None = None,
    stop: Stop | None = None,
    store_io: bool | None = None,
    media_expires: int | None = None,
    input_link_expires: int | None = None,
) -> State[RunSummary]:
    """Edit every image under ``source`` with ``prompt``; stage the results and a manifest.

    ``options``: the edit's other fields for every image (``quality``, ``image_size``,
    ``input_fidelity``, ``output_format``, ``background``, ``num_images``). The rest is as in
    ``batch_to_s3``: without a bucket the results stay in ``output_dir`` (and the sources go
    to fal inline, up to ``PREFECT_GPTIMAGE_INLINE_INPUT_MAX_BYTES``); a run with failed rows
    ends Failed with a :class:`~prefect_gptimage.errors.BatchIncomplete` carrying the summary.
    A missing source, an unreadable or non-image file raises one error before anything is paid.
    """
    log = get_run_logger()
    max_cost = check_budget(max_cost)
    fields = dict(options or {})
    for reserved in ("prompt", "image_urls", "mask_image_url"):
        if reserved in fields:
            raise InvalidRequestError(reserved, "set by edit_folder_to_s3 itself, not in options")
    sources = list_sources(source)
    rows = edit_rows(sources, prompt, fields, mask)
    target, s3_client = preflight_bucket(
        bucket, prefix, presign_expires=presign_expires, probe=False
    )
    check_lock_service()  # a Redis lock that refuses us: one line, before anything is paid
    run_options = RunOptions(
        bucket=bucket,
        prefix=prefix,
        output_dir=output_dir,
        credentials=credentials,
        timeout=timeout,
        refresh=refresh,
        presign_expires=presign_expires,
        resubmit_unknown=resubmit_unknown,
        concurrency=concurrency,
        lookahead=lookahead,
        max_cost=max_cost,
        store_io=store_io,
        media_expires=media_expires,
        input_link_expires=input_link_expires,
    )
    warn_retention(run_options, log)
    rows, resolver = prepare_inputs(rows, source, run_options, target, s3_client, dry_run=dry_run)
    rows = unique_rows(rows)  # the same photo twice: edited (and paid) once
    run_key = edit_run_key(source, prompt, fields, mask)
    return run_rows(
        rows,
        run_key,
        run_options,
        target,
        s3_client,
        dry_run=dry_run,
        stop=stop,
        resolver=resolver,
    )
