"""``batch_to_s3``: a prompt file (JSONL or CSV) in, images in S3 with a manifest out.

One request per row, fanned out under a concurrency cap through a bounded window (at most 256
rows in flight, results back in file order), and reported as it goes: each image's manifest
line and gallery figure go to disk at once, so a 10,000-row file never becomes one giant flow
state. Every row is validated before anything is paid for; ``dry_run`` prints the estimated cost
and submits nothing; ``max_cost`` refuses a batch whose uncached rows would cost more (cached
rows are free). Running the same batch again submits nothing and writes no duplicate object; a
batch killed half way resumes where it was.

``bucket`` is a bucket name or a prefect-aws ``S3Bucket`` block (its folder is the prefix unless
``prefix`` is given; its credentials sign the uploads and links).

A batch in which any row failed ends Failed with a :class:`BatchIncomplete` that carries the
:class:`RunSummary`: a plain call raises it, and with ``return_state=True``
``state.result(raise_on_failure=False).summary`` is the summary.

Example:
    >>> try:
    ...     summary = batch_to_s3("prompts.jsonl", bucket="my-images", concurrency=8)
    ... except BatchIncomplete as exc:
    ...     summary = exc.summary  # the images that were made, and the failures
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.logging import get_run_logger
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_aws import S3Bucket

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.errors import BatchIncomplete, DuplicateRequestId, FalError
from prefect_gptimage.flows._preflight import check_budget, preflight_bucket
from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.prompts import PromptRow, load_prompt_file
from prefect_gptimage.reporting.artifacts import (
    BatchProgress,
    artifact_key,
)
from prefect_gptimage.reporting.run_report import RunReport
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.s3 import slugify
from prefect_gptimage.s3.clients import use_s3_client
from prefect_gptimage.s3.preflight import probe_bucket
from prefect_gptimage.schemas import RequestIdLedger, use_request_id_ledger
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.cache import is_submit_cached, request_fingerprint
from prefect_gptimage.tasks.generate import GenerationOptions
from prefect_gptimage.tasks.intents import unresolved_intent
from prefect_gptimage.tasks.rows import RowOutcome, generate_and_stage
from prefect_gptimage.tasks.window import in_order

#: How often (seconds) the flow logs its progress and ETA.
LOG_EVERY_S = 15.0


def run_key_for(prompt_file: str | Path, defaults: dict[str, Any] | None) -> str:
    """A deterministic name for a batch: the file's stem and a hash of its content and defaults."""
    path = Path(prompt_file)
    digest = hashlib.sha256(path.read_bytes())
    digest.update(json.dumps(defaults or {}, sort_keys=True).encode())
    return f"batch-{slugify(path.stem, 40, default='prompts')}-{digest.hexdigest()[:10]}"


def unique_rows(rows: list[PromptRow]) -> list[PromptRow]:
    """Drop rows identical to an earlier one (same request, same variant): they'd pay twice."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = request_fingerprint(row.request, row.variant)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def plan_cost(rows: list[PromptRow], resubmit_unknown: bool = False) -> tuple[float, int]:
    """Estimated USD of the rows not already cached, and how many rows are cached (free).

    A row whose earlier submit's outcome is unknown is not submitted (so free) unless
    ``resubmit_unknown``.
    """
    cost, cached = 0.0, 0
    for row in rows:
        if is_submit_cached(row.request, row.variant) or (
            not resubmit_unknown and unresolved_intent(row.request, row.variant) is not None
        ):
            cached += 1
        else:
            cost += estimate_cost(row.request)
    return round(cost, 6), cached


@flow(name="gptimage-batch-to-s3", log_prints=False)
def batch_to_s3(
    prompt_file: str,
    bucket: str | S3Bucket | None = None,
    prefix: str | None = None,
    concurrency: int = 8,
    output_dir: str | None = None,
    defaults: dict[str, Any] | None = None,
    max_cost: float | None = None,
    dry_run: bool = False,
    timeout: float | None = None,
    refresh: bool = False,
    presign_expires: int = 86400,
    credentials: FalCredentials | None = None,
    resubmit_unknown: bool = False,
) -> State[RunSummary]:
    """Generate every row of ``prompt_file``; stage images and a JSONL manifest to ``bucket``.

    Without a bucket the images and manifest stay in ``output_dir`` only. ``prefix`` defaults to
    the ``S3Bucket`` block's folder, else ``gptimage``. When any row fails the run ends Failed
    with a :class:`BatchIncomplete` carrying the summary (a plain call raises it).

    Before the first submit it checks that the images can land (see
    :mod:`prefect_gptimage.flows._preflight`): ``max_cost`` is a finite number >= 0, the bucket
    name is valid, the fal host is an allowed media host and (not in a dry run) the bucket takes
    a write. Any failure raises one error and submits nothing.

    A row whose earlier submit's outcome is unknown (a dropped answer, a killed run: possibly
    billed) is not submitted again: it is listed as a failure "outcome unknown, possibly billed"
    (``error_type`` ``submit_outcome_unknown``) unless ``resubmit_unknown`` (or ``refresh``).
    """
    log = get_run_logger()
    max_cost = check_budget(max_cost)
    rows = unique_rows(load_prompt_file(prompt_file, defaults))
    target, s3_client = preflight_bucket(
        bucket, prefix, presign_expires=presign_expires, probe=False
    )
    run_key = run_key_for(prompt_file, defaults)
    estimate, cached = plan_cost(rows, resubmit_unknown=resubmit_unknown or refresh)
    summary = RunSummary(estimated_cost_usd=estimate)
    log.info(
        "%s: %d request(s), %d cached, estimated cost $%.3f", run_key, len(rows), cached, estimate
    )
    if dry_run:
        return Completed(
            data=summary, message=f"dry run: ${estimate:.3f} for {len(rows) - cached} request(s)"
        )
    if max_cost is not None and estimate > max_cost:
        return Failed(
            data=summary,
            message=f"estimated cost ${estimate:.3f} exceeds max_cost ${max_cost:.3f}: "
            "nothing submitted",
        )
    if target is not None:
        probe_bucket(target, s3_client)  # the bucket exists and takes a write: before paying
    out = Path(output_dir or get_settings().output_dir) / run_key
    progress = BatchProgress().start(len(rows), artifact_key(run_key, "progress"))
    last_log = 0.0
    runner: ThreadPoolTaskRunner[Any]
    options = GenerationOptions(
        credentials=credentials,
        output_dir=str(out),
        timeout=timeout,
        refresh_cache=refresh,
        resubmit_unknown=resubmit_unknown,
        max_in_flight=concurrency,
    )

    def submit(row: PromptRow) -> Any:
        return runner.submit(
            generate_and_stage,  # type: ignore[arg-type]  # (overloads favour async tasks)
            parameters={
                "request": row.request,
                "target": target,
                "options": options.model_copy(update={"variant": row.variant}),
            },
        )

    # one fal request id per request: a second row given the same id fails (see _flag_duplicates)
    ledger = RequestIdLedger()
    reported: dict[str, PromptRow] = {}
    # twice the fal cap in workers: while one row downloads and uploads, the next is already at fal
    with (
        use_s3_client(s3_client),
        use_request_id_ledger(ledger),
        RunReport(out, run_key, target, summary) as report,
        ThreadPoolTaskRunner(max_workers=2 * max(1, concurrency)) as runner,
    ):
        # rows come back in file order, so the same batch always writes the same manifest
        for row, result in in_order(rows, submit, on_finished=progress.advance):
            if isinstance(result, RowOutcome):
                # generate() claims it first when it can: then nothing was staged twice
                with contextlib.suppress(DuplicateRequestId):
                    ledger.claim(result.request_id, row.request, row.variant)
                if ledger.conflicted(result.request_id):
                    report.fail(_duplicate(result.request_id, ledger), row.request)
                else:
                    report.add(result, row.request.prompt)
                    reported[result.request_id] = row
            else:
                report.fail(
                    result if isinstance(result, BaseException) else RuntimeError(str(result)),
                    row.request,
                )
            if progress.elapsed - last_log >= LOG_EVERY_S:
                last_log = progress.elapsed
                log.info("%s: %s", run_key, progress.status())  # counts, elapsed, ETA
        progress.finish()
        log.info("%s: %s", run_key, progress.status())
        _flag_duplicates(ledger, reported, report)
        state = report.close()
    if report.summary.ok:
        return state
    # a plain call raises this exception, and it carries the summary (Failed(data=summary) lost it)
    return Failed(message=state.message, data=BatchIncomplete(report.summary, state.message))


def _duplicate(request_id: str, ledger: RequestIdLedger) -> DuplicateRequestId:
    prompts = ", ".join(repr(p[:60]) for p in ledger.conflicts().get(request_id, []))
    return DuplicateRequestId(
        f"fal returned request id {request_id} for several different requests of this batch "
        f"(prompts {prompts}): which one it belongs to is unknown, so every row involved fails",
        request_id=request_id,
    )


def _flag_duplicates(
    ledger: RequestIdLedger, reported: dict[str, PromptRow], report: RunReport
) -> None:
    """Fail the rows reported as done before a later row claimed their request id too.

    The later row never staged anything (its claim failed first); the earlier one had already
    staged and been reported, so its images stay listed and its failure is added beside them.
    """
    for request_id in ledger.conflicts():
        row = reported.get(request_id)
        if row is not None:
            error: FalError = _duplicate(request_id, ledger)
            report.fail(error, row.request)
