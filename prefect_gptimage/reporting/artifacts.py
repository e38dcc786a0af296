"""Prefect artifacts for a batch: a results table, a thumbnail gallery, links, live progress.

What the Prefect UI (3.8) renders, and so what this package produces:

* a **table** artifact: one row per image and per failure, five short columns (a link to the
  image named by its S3 object, ``00-a-lighthouse-at-dawn.png``, the prompt cut to 60
  characters, size/quality/format, estimated cost, status), so it reads at 1400 px
  (:func:`results_table`, here); request ids, ``s3://`` URIs, bytes and checksums are in the run
  manifest. A run through the OCR gate folds each image's verdict into
  its status (``ok · OCR 1.00: GRAND OPENING (attempt 2/3)``) rather than adding columns;
* a **markdown gallery**: linked thumbnails with escaped prompts
  (:func:`~prefect_gptimage.gallery.gallery_markdown`);
* per-image **link** artifacts only on request (``max_links``), each with its own key: by default
  the links are folded into the table and the gallery instead of one unnamed card per image;
* a **progress** artifact (:class:`~prefect_gptimage.progress.BatchProgress`) updated at most
  every ~2 % or 2 s.

Every artifact is keyed (``{key_prefix}-results``, ``-gallery``, ``-progress``), so a re-run
adds a version to the same entry of the Artifacts page. Text in them is escaped for the Prefect
UI's markdown renderer without entities it would show literally (see
:mod:`prefect_gptimage.reporting.gallery`).

This module publishes the first three (:func:`publish_results`) and is the import point for all
of it: the gallery writers (:mod:`prefect_gptimage.reporting.gallery`), progress
(:mod:`prefect_gptimage.reporting.progress`) and :func:`artifact_key`
(:mod:`prefect_gptimage.reporting.artifact_keys`) are re-exported here.

The images are shown through presigned S3 URLs, which the viewer's browser fetches directly;
they stop working when the URLs expire (``S3Target.presign_expires``); the table, the gallery and
each link artifact state when (:func:`~prefect_gptimage.reporting.gallery.links_lifetime`). With
``PREFECT_GPTIMAGE_PUBLIC_BASE_URL`` set they are ``<base>/<key>`` links that do not expire, and
say so.

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
    Verdicts,
    escape_text,
    gallery_markdown,
    links_lifetime,
    lookup_request,
    safe_url,
    write_html_gallery,
)
from prefect_gptimage.reporting.manifest import ManifestTotals, cost_per_image
from prefect_gptimage.reporting.progress import BatchProgress, format_duration
from prefect_gptimage.reporting.wording import counted
from prefect_gptimage.s3 import StagedImage
from prefect_gptimage.schemas import AnyRequest

__all__ = [
    "TABLE_COLUMNS",
    "BatchProgress",
    "FailureLike",
    "PublishedArtifacts",
    "artifact_key",
    "format_duration",
    "gallery_markdown",
    "image_name",
    "publish_results",
    "results_table",
    "write_html_gallery",
]

_log = logging.getLogger(__name__)


#: Columns of the results table artifact, in order.
TABLE_COLUMNS = ("image", "prompt", "size", "cost_usd", "status")


def image_name(image: StagedImage) -> str:
    """What a person calls a staged image: its S3 object's name (the key's last part).

    Staged keys end in ``{index:02d}-{prompt-slug}.{ext}``, so the name reads as the prompt and
    is found as is in the bucket; the table's prompt column has the prompt itself.

    Example:
        >>> import datetime as dt
        >>> image_name(StagedImage(bucket="b", key="gptimage/e/r/00-a-lighthouse.png",
        ...     s3_uri="s3://b/gptimage/e/r/00-a-lighthouse.png", url="https://x",
        ...     url_expires_at=dt.datetime(2026, 1, 1), content_type="image/png", format="png",
        ...     bytes=1, sha256="0", width=1, height=1, request_id="r", endpoint="e", index=0,
        ...     uploaded=True))
        '00-a-lighthouse.png'
    """
    return image.key.rstrip("/").rsplit("/", 1)[-1] or f"{image.index:02d}.{image.format}"


def _md_link(text: str, url: str) -> str:
    """A markdown link to an http(s) URL (anything else: the text alone)."""
    if safe_url(url) == "#":
        return text
    return f"[{text}]({url.replace('(', '%28').replace(')', '%29').replace(' ', '%20')})"


def results_table(
    staged: Sequence[StagedImage],
    failures: Sequence[FailureLike] = (),
    *,
    prompts: Mapping[str, str] | None = None,
    requests: Mapping[str, AnyRequest] | None = None,
    max_rows: int | None = None,
    prompt_chars: int = 60,
    verdicts: Verdicts | None = None,
    billed: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Rows for the table artifact: images first, then failures (``status`` tells them apart).

    Five short columns (:data:`TABLE_COLUMNS`): ``image`` (a markdown link to the presigned URL,
    named by the S3 object, ``00-a-lighthouse-at-dawn.png``: the image's index and its prompt's
    slug, see :func:`image_name`), ``prompt`` (cut to ``prompt_chars``), ``size``
    (``WxH quality format``),
    ``cost_usd`` and ``status`` (``ok`` or ``failed: reason``; with ``verdicts``, a gated image's
    status is ``ok · OCR 1.00: GRAND OPENING (attempt 2/3)``). The Prefect UI renders each cell
    as markdown, so text is escaped (:func:`escape_text`). Everything else about an image is in
    the run manifest. With ``billed`` (request id -> what fal billed per image: a reconciled
    run), a ``billed_usd`` column follows ``cost_usd``.

    Example:
        >>> from prefect_gptimage.reporting.manifest import FailureLine
        >>> results_table([], [FailureLine(prompt="p|q", parameters={}, endpoint="e",
        ...                                reason="<r>")])
        ... # doctest: +NORMALIZE_WHITESPACE
        [{'image': '', 'prompt': 'p\\\\|q', 'size': '', 'cost_usd': None,
          'status': 'failed: &lt;r&gt;'}]
    """
    rows: list[dict[str, Any]] = []
    for image in staged:
        prompt, request = lookup_request(image.request_id, prompts, requests)
        quality = f" {request.quality}" if request is not None else ""
        verdict = (verdicts or {}).get((image.request_id, image.index))
        status = (
            "ok" if verdict is None else f"ok · {escape_text(verdict.label(), 60, in_table=False)}"
        )
        rows.append(
            {
                "image": _md_link(escape_text(image_name(image), 60), image.url),
                "prompt": escape_text(prompt, prompt_chars, in_table=False),
                "size": f"{image.width}x{image.height}{quality} {image.format}",
                "cost_usd": cost_per_image(request),
                **({"billed_usd": billed.get(image.request_id)} if billed is not None else {}),
                "status": status,
            }
        )
    for failure in failures:
        rows.append(
            {
                "image": "",
                "prompt": escape_text(failure.prompt, prompt_chars, in_table=False),
                "size": "",
                "cost_usd": None,
                **({"billed_usd": None} if billed is not None else {}),
                "status": f"failed: {escape_text(failure.reason, 80, in_table=False)}",
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
    max_links: int = 0,
    max_gallery: int = 60,
    max_table_rows: int = 2000,
    totals: ManifestTotals | None = None,
    manifest_uri: str | None = None,
    verdicts: Verdicts | None = None,
    note: str | None = None,
    billed: Mapping[str, float] | None = None,
) -> PublishedArtifacts:
    """Create the table and gallery artifacts of a batch (in the current flow run).

    Args:
        staged: the staged images.
        failures: manifest failure lines, or any records with ``prompt``, ``reason``,
            ``request_id`` and ``error_type`` (shown escaped).
        key_prefix: start of the artifact keys (sanitized): ``{key_prefix}-results`` (table),
            ``{key_prefix}-gallery`` (markdown).
        requests: request id -> the request (its ``prompt``, and quality/size for the cost
            column).
        prompts: request id -> prompt, when ``requests`` is not at hand (takes precedence).
        max_links: also create a link artifact for each of the first ``max_links`` images, keyed
            ``{key_prefix}-image-{request}-{index}`` (each key is an entry of its own on the
            Artifacts page). Default 0: the links are in the table and the gallery only.
        max_gallery: thumbnails in the gallery (each is a full image the browser downloads).
        max_table_rows: table rows (the manifest has every line).
        totals: the whole run's counts and cost, when ``staged`` holds only its first images
            (a large batch keeps only what the table shows); by default counted from ``staged``.
        manifest_uri: where the run manifest is (``s3://...``), named in the table's description
            as the place for the details.
        verdicts: the OCR gate's verdict per image, by ``(request_id, index)``, shown in the
            table's status column and the gallery (a gated run).
        note: one sentence of plain text added (escaped) to the table's description and under
            the gallery's counts, e.g. the gate's regenerations and cost.
        billed: request id -> what fal billed per image (a reconciled run): a ``billed_usd``
            column, and the billed total beside the estimate (from ``totals``).

    Example:
        >>> @flow  # doctest: +SKIP
        ... def batch():
        ...     staged = [stage_image_task(i, req.prompt, req, target) for i in images]
        ...     publish_results(staged, key_prefix="nightly", requests={rid: req})
    """
    from prefect.artifacts import (
        acreate_link_artifact,
        acreate_markdown_artifact,
        acreate_table_artifact,
    )

    if not in_run():
        raise RuntimeError(
            "publish_results() must run inside a Prefect flow or task run: artifacts are "
            "attached to the run (creating them outside one is deprecated in Prefect 3)"
        )

    table_key = artifact_key(key_prefix, "results")
    gallery_key = artifact_key(key_prefix, "gallery")
    rows = results_table(
        staged,
        failures,
        prompts=prompts,
        requests=requests,
        max_rows=max_table_rows,
        verdicts=verdicts,
        billed=billed,
    )
    n_images = len(staged) if totals is None else totals.images
    total_rows = n_images + len(failures)
    table_desc = f"{counted(n_images, 'image')}, {counted(len(failures), 'failure')}"
    if total_rows > len(rows):
        table_desc += f"; first {len(rows)} rows shown, the run manifest has all {total_rows}"
    if billed is not None and totals is not None and totals.billed_cost_usd is not None:
        estimated, paid = totals.estimated_cost_usd, totals.billed_cost_usd
        table_desc += f"; estimated ${estimated:.3f}, fal billed ${paid:.3f}"
    if note:
        table_desc += f". {escape_text(note.rstrip('.'), 500, in_table=False)}"
    table_desc += (
        f". Request ids, s3:// URIs, bytes and checksums: manifest {manifest_uri}"
        if manifest_uri
        else ". Request ids, s3:// URIs, bytes and checksums: the run manifest"
    )
    lifetime = links_lifetime(staged[:max_gallery])
    if lifetime:
        table_desc += f". Image links: {lifetime}"
    table_id = call_sync(acreate_table_artifact, table=rows, key=table_key, description=table_desc)
    gallery_id = call_sync(
        acreate_markdown_artifact,
        markdown=gallery_markdown(
            staged,
            failures,
            title=title or f"{key_prefix}: generated images",
            prompts=prompts,
            requests=requests,
            max_images=max_gallery,
            totals=totals,
            verdicts=verdicts,
            note=note,
            billed=billed,
        ),
        key=gallery_key,
        description=f"Thumbnail gallery of {counted(n_images, 'image')}"
        + (f" ({lifetime})" if lifetime else ""),
    )
    link_ids: list[UUID] = []
    for image in staged[:max_links]:
        prompt, _ = lookup_request(image.request_id, prompts, requests)
        link_ids.append(
            call_sync(
                acreate_link_artifact,
                link=image.url,
                link_text=(
                    f"{image.index:02d} {escape_text(prompt, 60, in_table=False)} "
                    f"({image.width}x{image.height})"
                ),
                key=artifact_key(key_prefix, "image", image.request_id, image.index),
                description=(f"{image.s3_uri} ({links_lifetime([image])})"),
            )
        )
    omitted = max(0, n_images - max_links) if max_links > 0 else 0
    if omitted:
        run_logger(_log).info(
            "%s no link artifact (cap %d); see table %r",
            f"{counted(omitted, 'image')} {'has' if omitted == 1 else 'have'}",
            max_links,
            table_key,
        )
    return PublishedArtifacts(
        table_key=table_key,
        table_id=table_id,
        gallery_key=gallery_key,
        gallery_id=gallery_id,
        link_ids=link_ids,
        links_omitted=omitted,
    )
