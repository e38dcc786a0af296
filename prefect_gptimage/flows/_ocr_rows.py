"""One row of ``ocr_gated_batch``: generate, read each image's text, regenerate until it passes.

The row task (:func:`ocr_gated_row`) is one task run per prompt-file row: it asks for the row's
images, checks each with :func:`~prefect_gptimage.quality.gate.ocr_check` against the text the
prompt quotes, and regenerates as a new ``variant`` (from :func:`attempt_variants`) until the
row's images pass, its variants run out, a stop is asked for or ``max_cost`` would be exceeded.
What it did is an :class:`OcrGateRow`, one :class:`OcrAttempt` per request. The flow is in
:mod:`prefect_gptimage.flows.ocr_gate`, which re-exports these names.
"""

from __future__ import annotations

from collections import defaultdict

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel, Field

from prefect_gptimage.engine.budget import OVER_BUDGET, Budget
from prefect_gptimage.engine.plan import plan_row
from prefect_gptimage.engine.settle import not_started
from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.prompts import PromptRow
from prefect_gptimage.quality.gate import OcrVerdict, ocr_check
from prefect_gptimage.quality.text import DEFAULT_MIN_SCORE, quoted_text
from prefect_gptimage.reporting.summary import Failure
from prefect_gptimage.s3 import S3Target, StagedImage, stage_image
from prefect_gptimage.schemas import AnyRequest, DownloadedImage
from prefect_gptimage.tasks.cache import request_fingerprint
from prefect_gptimage.tasks.generate import generate
from prefect_gptimage.tasks.options import GenerationOptions
from prefect_gptimage.tasks.rows import row_run_name

__all__ = [
    "OCR_MISMATCH",
    "OcrAttempt",
    "OcrGateRow",
    "attempt_variants",
    "ocr_gated_row",
]

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
