"""Before a run of edits pays anything: every input read, checked and staged, once.

:func:`prepare_inputs` resolves the inputs of every row (:mod:`prefect_gptimage.inputs`): local
files and ``s3://`` objects are read with the user's own credentials, checked (an image, within
fal's size limit, a mask the size of its image) and uploaded by content to the run's bucket
under ``<prefix>/inputs/`` (inline ``data:`` URIs without a bucket; nothing at all in a dry
run). Every bad input of every row is reported at once, with its line, before the first submit.
Each row's links are signed again as it starts (:func:`fresh_links`), so a row that starts hours
into a run still gives fal a live link. It also warns when fal's media lifetime is shorter than
what staging can promise (:func:`~prefect_gptimage.fal.retention.lifetime_warning`).
"""

from __future__ import annotations

import logging
from typing import Any

from prefect_gptimage.engine.options import RunOptions
from prefect_gptimage.fal.retention import lifetime_warning
from prefect_gptimage.inputs import InputResolver, InputStager
from prefect_gptimage.prompts import PromptRow, resolve_row_inputs
from prefect_gptimage.s3 import S3Target
from prefect_gptimage.settings import get_settings

__all__ = ["fresh_links", "prepare_inputs", "warn_retention"]


def prepare_inputs(
    rows: list[PromptRow],
    where: str,
    options: RunOptions,
    target: S3Target | None,
    s3_client: Any,
    *,
    dry_run: bool = False,
) -> tuple[list[PromptRow], InputResolver]:
    """``rows`` with their edits' inputs resolved, and the run's resolver (see the module docs).

    ``where`` names the rows' origin (the prompt file, the folder) in the error, which lists
    every bad input as ``line N: image_urls: <input>: <reason>``.
    """
    settings = get_settings()
    stager = InputStager(
        bucket=target.bucket if target is not None else None,
        prefix=target.prefix if target is not None else "gptimage",
        client=s3_client,
        link_expires=options.input_link_expires or settings.input_link_expires,
        inline_max_bytes=settings.inline_input_max_bytes,
    )
    resolver = InputResolver(stager, read_only=dry_run)
    return resolve_row_inputs(rows, resolver, where), resolver


def fresh_links(resolver: InputResolver | None, row: PromptRow) -> PromptRow:
    """``row`` with the links to its staged inputs signed anew (as it starts)."""
    if resolver is None:
        return row
    return PromptRow(line=row.line, request=resolver.signed_anew(row.request), variant=row.variant)


def warn_retention(options: RunOptions, log: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """Warn when fal may delete the images before this run can stage them."""
    settings = get_settings()
    media_expires = options.media_expires or settings.media_expires
    warning = lifetime_warning(media_expires, options.timeout or settings.request_timeout)
    if warning is not None:
        log.warning(warning)
