"""Prefect artifacts for a batch: a results table, a thumbnail gallery, links, live progress.

What the Prefect UI (3.8) renders, and so what this package produces:

* a **table** artifact: one row per image (prompt, request id, S3 URI, presigned link, WxH,
  format, estimated cost) and per failure (:func:`results_table`, here);
* a **markdown gallery**: linked thumbnails with escaped prompts
  (:func:`~prefect_gptimage.gallery.gallery_markdown`);
* one **link** artifact per image, capped (default 50; the rest are in the table);
* a **progress** artifact (:class:`~prefect_gptimage.progress.BatchProgress`) updated at most
  every ~2 % or 2 s.

This module publishes the first three (:func:`publish_results`) and is the import point for all
of it: the gallery writers (:mod:`prefect_gptimage.reporting.gallery`), progress
(:mod:`prefect_gptimage.reporting.progress`) and :func:`artifact_key`
(:mod:`prefect_gptimage.reporting.artifact_keys`) are re-exported here.

The images are shown through presigned S3 URLs, which the viewer's browser fetches directly;
they stop working when the URLs expire (``S3Target.presign_expires``).

Artifact keys may hold only lowercase letters, digits and dashes: build them with
:func:`artifact_key`. Creating artifacts needs a Prefect API; inside a flow run they are attached
to that run.

Example:
    >>> artifact_key("Nightly Batch", "2026-11-24", "gallery")
    'nightly-batch-2026-11-24-gallery'
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from pydantic import BaseModel, Field

from prefect_gptimage._run_context import call_sync, in_run, run_logger
from prefect_gptimage.reporting.artifact_keys import ARTIFACT_KEY_MAX as ARTIFACT_KEY_MAX
from prefect_gptimage.reporting.artifact_keys import artifact_key
from prefect_gptimage.reporting.gallery import THUMB_WIDTH as THUMB_WIDTH
from prefect_gptimage.reporting.gallery import (
    FailureLike,
    escape_text,
    gallery_markdown,
    lookup_request,
    write_html_gallery,
)
from prefect_gptimage.reporting.manifest import ManifestTotals, cost_per_image
from prefect_gptimage.reporting.progress import BatchProgress, format_duration
from prefect_gptimage.s3 import StagedImage
from prefect_gptimage.schemas import AnyRequest

__all__ = [
    "BatchProgress",
    "FailureLike",
    "PublishedArtifacts",
    "artifact_key",
    "format_duration",
    "gallery_markdown",
    "publish_results",
    "results_table",
    "write_html_gallery",
]

_log = logging.getLogger(__name__)


def results_table(
    staged: Sequence[StagedImage],
    failures: Sequence[FailureLike] = (),
    *,
    prompts: Mapping[str, str] | None = None,
    requests: Mapping[str, AnyRequest] | None = None,
    max_rows: int | None = None,
) -> list[dict[str, Any]]:
    """Rows for the table artifact: images first, then failures (``status`` tells them apart).

    Example:
        >>> from prefect_gptimage.reporting.manifest import FailureLine
        >>> results_table([], [FailureLine(prompt="p", parameters={}, endpoint="e", reason="r")])
        ... # doctest: +NORMALIZE_WHITESPACE
        [{'status': 'failed', 'prompt': 'p', 'request_id': '', 'index': None, 's3_uri': '',
          'link': '', 'size': '', 'format': '', 'bytes': None, 'cost_usd': None, 'reason': 'r'}]
    """
    rows: list[dict[str, Any]] = []
    for image in staged:
        prompt, request = lookup_request(image.request_id, prompts, requests)
        rows.append(
            {
                "status": "ok",
                "prompt": " ".join(prompt.split())[:300],
                "request_id": image.request_id,
                "index": image.index,
                "s3_uri": image.s3_uri,
                "link": image.url,
                "size": f"{image.width}x{image.height}",
                "format": image.format,
                "bytes": image.bytes,
                "cost_usd": cost_per_image(request),
                "reason": "",
            }
        )
    for failure in failures:
        rows.append(
            {
                "status": "failed",
                "prompt": " ".join(failure.prompt.split())[:300],
                "request_id": failure.request_id or "",
                "index": None,
                "s3_uri": "",
                "link": "",
                "size": "",
                "format": "",
                "bytes": None,
                "cost_usd": None,
                "reason": failure.reason[:300],
            }
        )
    return rows if max_rows is None else rows[:max_rows]


class PublishedArtifacts(BaseModel):
    """Ids and keys of what :func:`publish_results` created."""

    table_key: str
    table_id: UUID
    gallery_key: str
    gallery_id: UUID
    link_ids: list[UUID] = Field(default_factory=list)
    links_omitted: int = 0


def publish_results(
    staged: Sequence[StagedImage],
    failures: Sequence[FailureLike] = (),
    *,
    key_prefix: str,
    requests: Mapping[str, AnyRequest] | None = None,
    prompts: Mapping[str, str] | None = None,
    title: str | None = None,
    max_links: int = 20,
    max_gallery: int = 60,
    max_table_rows: int = 2000,
    key_links: bool = False,
    totals: ManifestTotals | None = None,
) -> PublishedArtifacts:
    """Create the table, gallery and link artifacts of a batch (in the current flow run).

    Args:
        staged: the staged images.
        failures: manifest failure lines, or any records with ``prompt``, ``reason``,
            ``request_id`` and ``error_type`` (shown escaped).
        key_prefix: start of the artifact keys (sanitized): ``{key_prefix}-results`` (table),
            ``{key_prefix}-gallery`` (markdown).
        requests: request id -> the request (its ``prompt``, and quality/size for the cost
            column).
        prompts: request id -> prompt, when ``requests`` is not at hand (takes precedence).
        max_links: at most this many link artifacts; the rest are only in the table.
        max_gallery: thumbnails in the gallery (each is a full image the browser downloads).
        max_table_rows: table rows (the manifest has every line).
        key_links: give link artifacts keys (``{key_prefix}-image-{request}-{index}``). Off by
            default: each key is a separate entry on the global Artifacts page, while keyless
            links still show on the flow run's Artifacts tab.
        totals: the whole run's counts and cost, when ``staged`` holds only its first images
            (a large batch keeps only what the table shows); by default counted from ``staged``.

    Example:
        >>> @flow  # doctest: +SKIP
        ... def batch():
        ...     staged = [stage_image_task(i, req.prompt, req, target) for i in images]
        ...     publish_results(staged, key_prefix="nightly", requests={rid: req})
    """
    from prefect.artifacts import (
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    if not in_run():
        raise RuntimeError(
            "publish_results() must run inside a Prefect flow or task run: artifacts are "
            "attached to the run (creating them outside one is deprecated in Prefect 3)"
        )

    table_key = artifact_key(key_prefix, "results")
    gallery_key = artifact_key(key_prefix, "gallery")
    rows = results_table(
        staged, failures, prompts=prompts, requests=requests, max_rows=max_table_rows
    )
    n_images = len(staged) if totals is None else totals.images
    total_rows = n_images + len(failures)
    table_desc = f"{n_images} images, {len(failures)} failures"
    if total_rows > len(rows):
        table_desc += f"; first {len(rows)} rows shown, the run manifest has all {total_rows}"
    table_id = call_sync(create_table_artifact, table=rows, key=table_key, description=table_desc)
    gallery_id = call_sync(
        create_markdown_artifact,
        markdown=gallery_markdown(
            staged,
            failures,
            title=title or f"{key_prefix}: generated images",
            prompts=prompts,
            requests=requests,
            max_images=max_gallery,
            totals=totals,
        ),
        key=gallery_key,
        description=f"Thumbnail gallery of {n_images} images",
    )
    link_ids: list[UUID] = []
    for image in staged[:max_links]:
        prompt, _ = lookup_request(image.request_id, prompts, requests)
        link_ids.append(
            call_sync(
                create_link_artifact,
                link=image.url,
                link_text=(
                    f"{image.index:02d} {escape_text(prompt, 60)} ({image.width}x{image.height})"
                ),
                key=(
                    artifact_key(key_prefix, "image", image.request_id, image.index)
                    if key_links
                    else None
                ),
                description=f"{image.s3_uri} (presigned link, expires {image.url_expires_at:%c})",
            )
        )
    omitted = max(0, n_images - max_links)
    if omitted:
        run_logger(_log).info(
            "%d images have no link artifact (cap %d); see table %r", omitted, max_links, table_key
        )
    return PublishedArtifacts(
        table_key=table_key,
        table_id=table_id,
        gallery_key=gallery_key,
        gallery_id=gallery_id,
        link_ids=link_ids,
        links_omitted=omitted,
    )
