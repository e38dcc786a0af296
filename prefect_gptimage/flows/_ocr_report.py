"""How ``ocr_gated_batch`` reports its rows: the summary it returns and the run report's lines.

Each :class:`~prefect_gptimage.flows._ocr_rows.OcrGateRow` goes into the batch's
:class:`~prefect_gptimage.reporting.run_report.RunReport` (:func:`report_row`): every attempt as
a request with only the images kept from it and their OCR verdicts, then a failure line if the
row did not pass. :func:`summarize` totals the rows into the :class:`OcrGateSummary` and
:func:`note` is the gate's line in the artifacts.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from prefect_gptimage.engine.settle import RowInterrupted
from prefect_gptimage.errors import GptImageError, OcrGateFailed, PaidRequestFailed
from prefect_gptimage.flows._ocr_rows import OCR_MISMATCH, OcrGateRow
from prefect_gptimage.ledger import RequestIdLedger
from prefect_gptimage.prompts import PromptRow
from prefect_gptimage.quality.gate import OcrVerdict
from prefect_gptimage.quality.text import TextVerdict, quoted_text
from prefect_gptimage.reporting.manifest import OcrVerdictRecord
from prefect_gptimage.reporting.run_report import RunReport
from prefect_gptimage.reporting.summary import Failure, RunSummary
from prefect_gptimage.schemas import AnyRequest
from prefect_gptimage.tasks.rows import RowOutcome

__all__ = ["OcrGateSummary", "note", "report_row", "summarize"]


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


def _record(verdict: OcrVerdict, attempt: int, max_attempts: int, variant: int) -> OcrVerdictRecord:
    """The manifest's copy of a verdict, with which attempt of the row it judged."""
    fields = verdict.model_dump(include=set(TextVerdict.model_fields))
    return OcrVerdictRecord(**fields, attempt=attempt, max_attempts=max_attempts, variant=variant)


def report_row(
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


def summarize(summary: OcrGateSummary, results: list[OcrGateRow]) -> None:
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


def note(summary: OcrGateSummary) -> str:
    """The gate's line in the artifacts: rows passed, regenerations and what they cost."""
    return (
        f"OCR gate: {summary.passed} of {summary.rows} rows passed; regenerations: "
        f"{summary.regenerations}, costing ${summary.regeneration_cost:.3f} of "
        f"${summary.cost:.3f} in all (${summary.cost_this_run:.3f} paid by this run)"
    )
