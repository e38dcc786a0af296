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
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any, cast

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect_aws import S3Bucket
from pydantic import BaseModel, Field

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.engine.budget import OVER_BUDGET, Budget, refuse_over_budget
from prefect_gptimage.engine.options import RunOptions
from prefect_gptimage.engine.plan import plan_row, plan_rows
from prefect_gptimage.engine.run import RowEngine, stopped_state
from prefect_gptimage.engine.settle import RowInterrupted, not_started
from prefect_gptimage.engine.stop import Stop
from prefect_gptimage.errors import BatchIncomplete, GptImageError, OcrGateFailed, PaidRequestFailed
from prefect_gptimage.flows._fanout import row_runner
from prefect_gptimage.flows._preflight import check_budget, preflight_bucket
from prefect_gptimage.ledger import RequestIdLedger
from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.prompts import PromptRow, load_prompt_file, unique_rows
from prefect_gptimage.quality.gate import OcrVerdict, ocr_check
from prefect_gptimage.quality.ocr import require_ocr
from prefect_gptimage.quality.text import DEFAULT_MIN_SCORE, TextVerdict, quoted_text
from prefect_gptimage.reporting.manifest import OcrVerdictRecord
from prefect_gptimage.reporting.run_report import RunReport
from prefect_gptimage.reporting.summary import Failure, RunSummary
from prefect_gptimage.s3 import S3Target, StagedImage, slugify, stage_image
from prefect_gptimage.schemas import AnyRequest, DownloadedImage
from prefect_gptimage.tasks.cache import request_fingerprint
from prefect_gptimage.tasks.generate import GenerationOptions, generate
from prefect_gptimage.tasks.rows import RowOutcome, row_run_name

__all__ = [
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

#: ``error_type`` of a row whose images did not all pass OCR within its attempts.
OCR_MISMATCH = "ocr_mismatch"


class OcrAttempt(BaseModel):
    """One request of a row: its variant, what it cost, and the verdict on each image."""

    variant: int
    request_id: str
    from_cache: bool = Field(description="True when this run paid nothing for it (cached).")
    cost: float = Field(description="Estimated USD of the request (estimate_cost).")
    verdicts: list[OcrVerdict]
    kept: list[int] = Field(
        default_factory=list, description="Positions (in verdicts) of the images kept from it."
    )


class OcrGateRow(BaseModel):
    """One prompt-file row through the gate."""

    line: int
    prompt: str
    expected: str = Field(description="The text the prompt quotes ('' : nothing to check).")
    wanted: int = Field(description="Images the row asks for (num_images).")
    passed: bool = Field(description="Every wanted image passed within max_attempts.")
    attempts: list[OcrAttempt] = Field(default_factory=list)
    images: list[DownloadedImage] = Field(default_factory=list, description="Passing images.")
    staged: list[StagedImage] = Field(default_factory=list, description="Their S3 copies.")
    error: str | None = Field(default=None, description="Why the row stopped, if it failed.")
    error_type: str | None = Field(
        default=None, description="ocr_mismatch, or the error that stopped its request."
    )

    @property
    def regenerations(self) -> int:
        return max(0, len(self.attempts) - 1)

    @property
    def cost(self) -> float:
        return round(sum(a.cost for a in self.attempts), 6)

    @property
    def regeneration_cost(self) -> float:
        return round(sum(a.cost for a in self.attempts[1:]), 6)


class OcrGateSummary(RunSummary):
    """What ``ocr_gated_batch`` did: a batch's :class:`RunSummary` (images, failures, what this
    run paid, manifest, gallery), plus the gate's totals, then every row in file order."""

    run_key: str = ""
    rows: int = 0
    passed: int = 0
    failed: int = 0
    staged: int = Field(default=0, description="Images staged to S3 (0 without a bucket).")
    regenerations: int = Field(default=0, description="Attempts beyond each row's first.")
    cost: float = Field(
        default=0.0, description="Estimated USD of every attempt, cached ones included."
    )
    regeneration_cost: float = Field(
        default=0.0, description="The part of cost spent on regenerations."
    )
    cost_this_run: float = Field(
        default=0.0, description="Estimated USD of the attempts this run submitted."
    )
    ocr_seconds: float = Field(default=0.0, description="Time spent reading images.")
    results: list[OcrGateRow] = Field(default_factory=list)


def attempt_variants(rows: list[PromptRow], max_attempts: int) -> list[list[int]]:
    """The variants each row may use, first its own, then disjoint fresh ones.

    Example:
        >>> from prefect_gptimage.prompts import row_to_request
        >>> a, b = row_to_request({"prompt": 'a "sign"'}), row_to_request({"prompt": "a cat"})
        >>> attempt_variants([a, b, a], 3)
        [[0, 1, 2], [0, 1, 2], [0, 3, 4]]
    """
    used: dict[str, set[int]] = defaultdict(set)
    identity = [request_fingerprint(row.request, 0) for row in rows]
    for ident, row in zip(identity, rows, strict=True):
        used[ident].add(row.variant)
    next_free = {ident: max(variants) + 1 for ident, variants in used.items()}
    plans: list[list[int]] = []
    for ident, row in zip(identity, rows, strict=True):
        start = next_free[ident]
        next_free[ident] = start + max_attempts - 1
        plans.append([row.variant, *range(start, start + max_attempts - 1)])
    return plans


@task(name="gptimage-ocr-gated-row", task_run_name=row_run_name, cache_policy=NO_CACHE)
def ocr_gated_row(
    line: int,
    request: AnyRequest,
    variants: list[int],
    target: S3Target | None,
    options: GenerationOptions,
    min_score: float = DEFAULT_MIN_SCORE,
    budget: Budget | None = None,
) -> OcrGateRow:
    """Generate, check and regenerate one row until its images pass or ``variants`` run out.

    One task run: every request in it is a plain call (each cached as a request is). Before
    each regeneration it asks ``options.stop`` (none after a stop) and ``budget`` (none that
    would exceed ``max_cost``; a cached one is free).
    """
    log = get_run_logger()
    expected = quoted_text(request.prompt)
    row = OcrGateRow(
        line=line, prompt=request.prompt, expected=expected, wanted=request.num_images, passed=False
    )
    for number, variant in enumerate(variants):
        if number and not _may_regenerate(row, request, variant, options, budget):
            break
        try:
            result = generate(request, options.model_copy(update={"variant": variant}))
        except Exception as exc:
            failure = Failure.from_exception(exc, request, line)
            row.error, row.error_type = failure.reason, failure.error_type
            log.error("row %s: variant %s failed: %s", line, variant, row.error)
            break  # what passed so far is still staged
        verdicts = [ocr_check(image, expected, min_score) for image in result.images]
        room = row.wanted - len(row.images)
        kept = [k for k, v in enumerate(verdicts) if v.passed][:room]
        row.attempts.append(
            OcrAttempt(
                variant=variant,
                request_id=result.handle.request_id,
                from_cache=result.from_cache,
                cost=estimate_cost(request),
                verdicts=verdicts,
                kept=kept,
            )
        )
        row.images += [result.images[k] for k in kept]
        if len(row.images) == row.wanted:
            row.passed = True
            break
        for verdict in verdicts:
            if not verdict.passed:
                log.warning(
                    "row %s, variant %s: read %r, expected %r (score %.3f < %.2f)",
                    line,
                    variant,
                    verdict.read_text,
                    expected,
                    verdict.score,
                    min_score,
                )
    if not row.passed and row.error is None:
        row.error, row.error_type = _mismatch(row, min_score), OCR_MISMATCH
    if target is not None:
        row.staged = [
            stage_image(image, prompt=request.prompt, request=request, target=target)
            for image in row.images
        ]
    return row


def _may_regenerate(
    row: OcrGateRow,
    request: AnyRequest,
    variant: int,
    options: GenerationOptions,
    budget: Budget | None,
) -> bool:
    """Whether the row may try ``variant`` next; if not, the row's error says why."""
    if options.stop is not None and options.stop.requested:
        error = not_started(f"regeneration {variant} not submitted")
        row.error, row.error_type = error.message, error.error_type
        return False
    planned = plan_row(
        PromptRow(line=row.line, request=request, variant=variant),
        resubmit_unknown=options.resubmit_unknown,
        refresh=options.refresh_cache,
    )
    if budget is not None and not budget.allow(planned.cost):
        row.error = (
            f"regeneration not submitted: ${planned.cost:.3f} more would exceed max_cost "
            f"${budget.limit:.3f} (${budget.spent:.3f} planned or spent)"
        )
        row.error_type = OVER_BUDGET
        return False
    return True


def _mismatch(row: OcrGateRow, min_score: float) -> str:
    """Why a row failed OCR: the expected text and what was read in its last rejected image
    first (the results table shows a reason's first 80 characters), then the count."""
    reason = f"expected {row.expected!r}"
    rejected = [v for v in row.attempts[-1].verdicts if not v.passed] if row.attempts else []
    if rejected:
        last = rejected[0]
        reason += f", read {last.read_text!r} (score {last.score:.3f} < {min_score:.2f})"
    return (
        f"{reason}: {len(row.images)} of {row.wanted} image(s) passed OCR in "
        f"{len(row.attempts)} attempt(s)"
    )


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
        _summarize(summary, gated)
        return _note(summary)

    result = engine.run(
        rows,
        ocr_gated_row,
        parameters,
        partial(_report_row, gated, max_attempts),
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


def _record(verdict: OcrVerdict, attempt: int, max_attempts: int, variant: int) -> OcrVerdictRecord:
    """The manifest's copy of a verdict, with which attempt of the row it judged."""
    fields = verdict.model_dump(include=set(TextVerdict.model_fields))
    return OcrVerdictRecord(**fields, attempt=attempt, max_attempts=max_attempts, variant=variant)


def _report_row(
    gated: list[OcrGateRow],
    max_attempts: int,
    report: RunReport,
    ledger: RequestIdLedger,
    prompt_row: PromptRow,
    result: Any,
) -> list[str]:
    """One row into the run report: each attempt as a request (its cost counted), with only the
    images kept from it (staged: manifest lines, events, assets), then a failure if it failed.
    A row whose task failed (or a stop settled) is a failed row with no attempt."""
    request = prompt_row.request
    if isinstance(result, OcrGateRow):
        row = result
    else:
        error = result if isinstance(result, BaseException) else RuntimeError(str(result))
        failure = Failure.from_exception(error, request, prompt_row.line)
        row = OcrGateRow(
            line=prompt_row.line,
            prompt=request.prompt,
            expected=quoted_text(request.prompt),
            wanted=request.num_images,
            passed=False,
            error=failure.reason,
            error_type=failure.error_type,
        )
    gated.append(row)
    done = 0  # row.images (and row.staged) hold each attempt's kept images, attempt by attempt
    for number, attempt in enumerate(row.attempts, start=1):
        images = row.images[done : done + len(attempt.kept)]
        staged = row.staged[done : done + len(attempt.kept)]
        done += len(attempt.kept)
        outcome = RowOutcome(
            request_id=attempt.request_id,
            request=request,
            images=images,
            staged=staged,
            from_cache=attempt.from_cache,
        )
        verdicts = [
            _record(attempt.verdicts[k], number, max_attempts, attempt.variant)
            for k in attempt.kept
        ]
        report.add(outcome, request.prompt, ocr=verdicts)
    if not row.passed:
        _report_failure(report, row, request, max_attempts, interrupted=_interrupted(result))
    return [a.request_id for a in row.attempts if a.kept]


def _interrupted(result: Any) -> GptImageError | None:
    """A row a stop settled (in flight: wrapped with its paid request), else None."""
    cause = result.error if isinstance(result, PaidRequestFailed) else result
    return result if isinstance(cause, RowInterrupted) else None


def _report_failure(
    report: RunReport,
    row: OcrGateRow,
    request: AnyRequest,
    max_attempts: int,
    interrupted: GptImageError | None = None,
) -> None:
    """A failed row's failure line, with its last rejected verdict when OCR rejected it."""
    if interrupted is not None:  # settled by a stop: reported as the batch reports it
        report.fail(interrupted, request, row.line)
        return
    last = row.attempts[-1] if row.attempts else None
    ocr = None
    if last is not None:  # the last image rejected, if any: what was read when it gave up
        rejected = next((v for v in last.verdicts if not v.passed), None)
        if rejected is not None:
            ocr = _record(rejected, len(row.attempts), max_attempts, last.variant)
    # an OCR mismatch is about the last request; a request that failed was not that one
    request_id = last.request_id if last and row.error_type == OCR_MISMATCH else None
    error = OcrGateFailed(row.error or "failed", error_type=row.error_type, request_id=request_id)
    report.fail(error, request, row.line, ocr=ocr)


def _summarize(summary: OcrGateSummary, results: list[OcrGateRow]) -> None:
    """The gate's totals over its rows, into ``summary`` (the report fills in the rest)."""
    summary.results = results
    summary.rows = len(results)
    summary.passed = sum(r.passed for r in results)
    summary.failed = sum(not r.passed for r in results)
    summary.regenerations = sum(r.regenerations for r in results)
    summary.cost = round(sum(r.cost for r in results), 6)
    summary.regeneration_cost = round(sum(r.regeneration_cost for r in results), 6)
    summary.cost_this_run = round(
        sum(a.cost for r in results for a in r.attempts if not a.from_cache), 6
    )
    summary.ocr_seconds = round(
        sum(v.seconds for r in results for a in r.attempts for v in a.verdicts), 3
    )


def _note(summary: OcrGateSummary) -> str:
    """The gate's line in the artifacts: rows passed, regenerations and what they cost."""
    return (
        f"OCR gate: {summary.passed} of {summary.rows} rows passed; regenerations: "
        f"{summary.regenerations}, costing ${summary.regeneration_cost:.3f} of "
        f"${summary.cost:.3f} in all (${summary.cost_this_run:.3f} paid by this run)"
    )
