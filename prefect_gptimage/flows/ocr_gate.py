"""``ocr_gated_batch``: a prompt file in, only images whose text reads right staged out.

Per row: generate, read each image's text with OCR and compare it with the text the prompt
quotes (:mod:`prefect_gptimage.quality`); an image that does not match is regenerated as a new
``variant`` of the same request, up to ``max_attempts`` attempts per row. Every attempt is an
ordinary request: cached (a re-run pays for none of them again, and re-reads the same images),
and priced with :func:`~prefect_gptimage.pricing.estimate_cost`. Only passing images are staged
to S3 (with a bucket); the rest stay on disk beside them, for a look.

Variants: a row's first attempt is the row's own ``variant``. Regenerations take variants above
every variant the file uses for that same request, a disjoint run per row, so two rows asking
for two images of one prompt never share an attempt, and a re-run of the file picks the same
variants (and so finds them cached).

The run reports like a batch, through :class:`~prefect_gptimage.reporting.run_report.RunReport`:
``manifest.jsonl`` and ``index.html`` in the output folder, the manifest staged to S3 and the
results table and gallery artifacts published (with a bucket), a
``prefect-gptimage.image.staged`` event and an asset materialization per staged image, and one
``prefect-gptimage.batch.completed``. Each image line of the manifest carries the verdict
(``"ocr"``: what was read, the expected text, the score, ``min_score``, attempt ``k`` of
``max_attempts``, the variant); a row that did not pass gets a failure line naming the expected
text and what was read, with its last verdict. The table and the gallery show each verdict in
one short line (``OCR 1.00: GRAND OPENING (attempt 2/3)``) and the regenerations with their cost.

The returned :class:`OcrGateSummary` holds, per row, every attempt with each image's
:class:`~prefect_gptimage.quality.gate.OcrVerdict` (what OCR read, the expected text, the score),
the images kept and their S3 copies, the totals (rows, passed, regenerations and cost), and where
the manifest and the gallery are. Rows that fail do not fail the flow: it completes, and the
summary and the manifest list them (``batch.completed`` says ``"ok": false``).

Before anything is paid for, the file is validated, the bucket must take a write, and the
``ocr`` extra must be installed when any row quotes text (else one ``ConfigurationError``).

It runs on the row engine (:mod:`prefect_gptimage.engine`) as a batch does: each row one task run
(``row 3: a street sign that says "GRAND OPENING"``), a bounded window of ``concurrency`` rows at
fal, rows identical to an earlier one dropped (``unique_rows``), ``max_cost`` checked against the
rows' first attempts before anything is paid and, during the run, against every regeneration (a
row whose next attempt would exceed it stops: ``error_type`` ``over_budget``), and ``stop=``: a
stop starts no new row and no new regeneration (see :mod:`prefect_gptimage.engine.settle`); the
run then ends Failed with a ``BatchIncomplete`` carrying the summary.

Example::

    summary = ocr_gated_batch("signs.jsonl", bucket="my-images", max_attempts=3)
    print(summary.passed, summary.regenerations, summary.regeneration_cost)  # 20 7 0.063
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Any, cast

from prefect import flow
from prefect.logging import get_run_logger
from prefect_aws import S3Bucket

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.engine.budget import Budget, refuse_over_budget
from prefect_gptimage.engine.options import RunOptions
from prefect_gptimage.engine.plan import plan_rows
from prefect_gptimage.engine.run import RowEngine, stopped_state
from prefect_gptimage.engine.stop import Stop
from prefect_gptimage.errors import BatchIncomplete, OcrGateFailed
from prefect_gptimage.flows._fanout import row_runner
from prefect_gptimage.flows._ocr_report import OcrGateSummary, note, report_row, summarize
from prefect_gptimage.flows._ocr_rows import (
    OCR_MISMATCH,
    OcrAttempt,
    OcrGateRow,
    attempt_variants,
    ocr_gated_row,
)
from prefect_gptimage.flows._preflight import check_budget, preflight_bucket
from prefect_gptimage.prompts import PromptRow, load_prompt_file, unique_rows
from prefect_gptimage.quality.ocr import require_ocr
from prefect_gptimage.quality.text import DEFAULT_MIN_SCORE, quoted_text
from prefect_gptimage.s3 import slugify
from prefect_gptimage.tasks.prices import load_prices

__all__ = [
    "OCR_MISMATCH",
    "OcrAttempt",
    "OcrGateFailed",
    "OcrGateRow",
    "OcrGateSummary",
    "attempt_variants",
    "ocr_gated_batch",
]

#: Requests at fal at once, by default (the engine keeps twice that many rows in flight). OCR
#: itself runs one image at a time (it uses every core).
ROW_CONCURRENCY = 4


def _run_key(prompt_file: Path, max_attempts: int, min_score: float) -> str:
    digest = hashlib.sha256(prompt_file.read_bytes())
    digest.update(f"{max_attempts}:{min_score}".encode())
    return f"ocr-gate-{slugify(prompt_file.stem, 40)}-{digest.hexdigest()[:10]}"


@flow(name="gptimage-ocr-gated-batch", log_prints=False)
def ocr_gated_batch(
    prompt_file: str,
    bucket: str | S3Bucket | None = None,
    max_attempts: int = 3,
    min_score: float = DEFAULT_MIN_SCORE,
    prefix: str | None = None,
    output_dir: str | None = None,
    defaults: dict[str, Any] | None = None,
    credentials: FalCredentials | None = None,
    timeout: float | None = None,
    presign_expires: int = 86400,
    concurrency: int = ROW_CONCURRENCY,
    max_cost: float | None = None,
    refresh: bool = False,
    resubmit_unknown: bool = False,
    lookahead: int | None = None,
    stop: Stop | None = None,
) -> OcrGateSummary:
    """Generate every row of ``prompt_file``, regenerate images whose text OCR misreads, and stage
    the images that pass to ``bucket`` (if given).

    ``max_attempts`` counts requests per row, the first included. ``min_score`` is the similarity
    the text must reach (see :mod:`prefect_gptimage.quality.text`). Rows that still fail are in
    the summary with their last verdicts (``passed=False``) and in the manifest as failure lines;
    the flow itself completes. The manifest, gallery, artifacts, events and assets are a batch's
    (see the module docs); ``manifest_uri`` and ``gallery`` in the summary say where they are.

    ``concurrency``, ``max_cost``, ``refresh``, ``resubmit_unknown``, ``lookahead`` and ``stop``
    are the batch's (see :func:`~prefect_gptimage.flows.batch.batch_to_s3`); ``max_cost`` also
    bounds the regenerations. A run refused by ``max_cost`` (nothing submitted) or cut short by
    a stop ends Failed with a ``BatchIncomplete`` carrying the summary (a plain call raises it).
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    log = get_run_logger()
    max_cost = check_budget(max_cost)
    load_prices(credentials, log)  # fal's prices, once, before planning (issue 21)
    path = Path(prompt_file)
    rows = unique_rows(load_prompt_file(path, defaults))
    if any(quoted_text(row.request.prompt) for row in rows):
        require_ocr()  # a missing ocr extra fails here, before anything is paid for
    run_key = _run_key(path, max_attempts, min_score)
    target, s3_client = preflight_bucket(bucket, prefix, presign_expires=presign_expires)
    options = RunOptions(
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
    )
    plan = plan_rows(rows, resubmit_unknown=resubmit_unknown, refresh=refresh)  # first attempts
    summary = OcrGateSummary(run_key=run_key, estimated_cost_usd=plan.cost)
    engine = RowEngine(
        options, run_key, target, s3_client, summary, partial(row_runner, None), stop
    )
    refused = refuse_over_budget(run_key, plan, len(rows), max_cost, summary)
    if refused is not None:
        raise BatchIncomplete(summary, refused.message)
    generation = options.generation(str(engine.out), engine.stop)
    budget = Budget(max_cost, spent=plan.cost)  # the regenerations spend what is left
    variants = attempt_variants(rows, max_attempts)
    plans = {id(row): tries for row, tries in zip(rows, variants, strict=True)}
    gated: list[OcrGateRow] = []

    def parameters(row: PromptRow) -> dict[str, Any]:
        return {
            "line": row.line,
            "request": row.request,
            "variants": plans[id(row)],
            "target": target,
            "options": generation,
            "min_score": min_score,
            "budget": budget,
        }

    def finish() -> str:
        summarize(summary, gated)
        return note(summary)

    result = engine.run(
        rows,
        ocr_gated_row,
        parameters,
        partial(report_row, gated, max_attempts),
        finish=finish,
    )
    log.info(
        "OCR gate: %s/%s rows passed, %s regeneration(s) costing $%.3f of $%.3f in all; "
        "manifest %s",
        summary.passed,
        summary.rows,
        summary.regenerations,
        summary.regeneration_cost,
        summary.cost,
        summary.manifest_uri,
    )
    if result.cancelled:  # Prefect cancelled the run: it accepts only a Cancelled state
        return cast(OcrGateSummary, stopped_state(result))
    if result.interrupted:
        raise BatchIncomplete(summary, f"interrupted: {result.state.message}")
    # the report's own state (Failed when a row failed) is not the flow's: the gate's rows
    # failing is an answer, listed in the summary and the manifest, not a crash
    return summary
