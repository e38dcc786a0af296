"""``batch_to_s3``: a prompt file (JSONL or CSV) in, images in S3 with a manifest out.

One request per row, fanned out under a concurrency cap through a bounded window (twice the cap,
plus up to :data:`MAX_RESUMED_AHEAD` rows already submitted, in flight, results back in file
order), and reported as it goes: each image's manifest line and gallery figure go to disk at
once, so a 10,000-row file never becomes one giant flow state. Every row is validated before
anything is paid for; ``dry_run`` prints the estimated cost and submits nothing; ``max_cost``
refuses a batch whose uncached rows would cost more (cached rows are free). Running the same
batch again submits nothing and writes no duplicate object; a batch killed half way resumes
where it was.

**Stopping.** :func:`request_stop` (the CLI calls it on SIGTERM or SIGINT) stops a running batch
from starting rows: rows not started are reported "not started (interrupted)". Rows already
started get :data:`STOP_GRACE_S` seconds to finish; those still waiting on fal then are reported
"in flight (interrupted)" once their submit has been recorded (never in the middle of one), and
left running at fal: nothing is cancelled, and a re-run resumes them from the cache without
paying again. The run then ends Failed with the summary of what was staged.

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
import threading
from pathlib import Path
from typing import Any, NamedTuple

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.logging import get_run_logger
from prefect.states import Completed, Failed
from prefect.task_runners import TaskRunner
from prefect_aws import S3Bucket

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.errors import BatchIncomplete, DuplicateRequestId, FalError
from prefect_gptimage.flows._fanout import check_cluster, row_runner
from prefect_gptimage.flows._preflight import check_budget, preflight_bucket
from prefect_gptimage.flows._stop import (  # re-exported: the CLI stops a batch through here
    IN_FLIGHT as IN_FLIGHT,
)
from prefect_gptimage.flows._stop import (
    NOT_STARTED,
    RowInterrupted,
    SettledRow,
    StartedRow,
    forget_row,
    stop_event,
    watch_for_stop,
)
from prefect_gptimage.flows._stop import (
    STOP_GRACE_S as STOP_GRACE_S,
)
from prefect_gptimage.flows._stop import (
    STOP_SUBMIT_WAIT_S as STOP_SUBMIT_WAIT_S,
)
from prefect_gptimage.flows._stop import (
    request_stop as request_stop,
)
from prefect_gptimage.flows._stop import (
    reset_stop as reset_stop,
)
from prefect_gptimage.flows._stop import (
    stop_requested as stop_requested,
)
from prefect_gptimage.ledger import RequestIdLedger, use_request_id_ledger
from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.prompts import PromptRow, load_prompt_file, run_key_for, unique_rows
from prefect_gptimage.reporting.artifacts import (
    BatchProgress,
    artifact_key,
)
from prefect_gptimage.reporting.run_report import RunReport
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.s3.clients import use_s3_client
from prefect_gptimage.s3.preflight import probe_bucket
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.cache import is_submit_cached
from prefect_gptimage.tasks.concurrency import hand_over, local_cap
from prefect_gptimage.tasks.generate import GenerationOptions
from prefect_gptimage.tasks.intents import read_intent
from prefect_gptimage.tasks.rows import RowOutcome, generate_and_stage
from prefect_gptimage.tasks.window import in_order

#: Rows already submitted (the CLI's head start, a killed run) that widen the window beyond the
#: cap's, at most; also the most the head start submits ahead of the flow.
MAX_RESUMED_AHEAD = 128
#: How often (seconds) the flow logs its progress and ETA.
LOG_EVERY_S = 15.0
_live: list[RunSummary] = []  # the running batch's summary, for a process that must exit early


def live_summary() -> RunSummary | None:
    """The summary of the batch running in this process so far (None when none runs)."""
    return _live[-1] if _live else None


class Plan(NamedTuple):
    """What a batch's rows will cost, read from the cache and the submit intents."""

    cost: float  # estimated USD of the rows that will be submitted
    cached: int  # rows that cost nothing: cached, or left unsent ("outcome unknown")
    at_fal: int  # rows whose submit is recorded but not cached: resumed, needing no new slot


def plan_rows(rows: list[PromptRow], resubmit_unknown: bool = False) -> Plan:
    """The :class:`Plan` of ``rows``. A row whose earlier submit's outcome is unknown is not
    submitted (so free) unless ``resubmit_unknown``."""
    cost, cached, at_fal = 0.0, 0, 0
    for row in rows:
        if is_submit_cached(row.request, row.variant):
            cached += 1
            continue
        intent = read_intent(row.request, row.variant)
        if intent is not None and intent.unresolved and not resubmit_unknown:
            cached += 1
            continue
        cost += estimate_cost(row.request)
        at_fal += intent is not None and intent.state == "submitted"
    return Plan(round(cost, 6), cached, at_fal)


def plan_cost(rows: list[PromptRow], resubmit_unknown: bool = False) -> tuple[float, int]:
    """Estimated USD of the rows not already cached, and how many rows are cached (free)."""
    plan = plan_rows(rows, resubmit_unknown)
    return plan.cost, plan.cached


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
    lookahead: int | None = None,
    cluster: str | None = None,
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

    ``lookahead`` submits that many requests beyond ``concurrency`` to wait in fal's queue, so
    fal's slots never idle between two requests (None: ``PREFECT_GPTIMAGE_LOOKAHEAD``); use it
    when ``concurrency`` is your fal account's limit (see
    :mod:`prefect_gptimage.tasks.concurrency`).

    ``cluster`` (a Dask scheduler address, ``tcp://host:8786``) runs the rows on that cluster's
    workers instead of this process's threads; the manifest, progress and summary stay here.
    It needs prefect-dask, a Prefect server every worker reaches and, across machines, shared
    result storage (see :mod:`prefect_gptimage.flows._fanout`). ``concurrency`` then counts the
    requests in flight across the cluster; the cap at fal across workers is a global
    concurrency limit.
    """
    log = get_run_logger()
    max_cost = check_budget(max_cost)
    rows = unique_rows(load_prompt_file(prompt_file, defaults))
    target, s3_client = preflight_bucket(
        bucket, prefix, presign_expires=presign_expires, probe=False
    )
    run_key = run_key_for(prompt_file, defaults)
    hand_over()  # the CLI's head start stops here, each of its submits recorded
    plan = plan_rows(rows, resubmit_unknown=resubmit_unknown or refresh)
    estimate, cached = plan.cost, plan.cached
    summary = RunSummary(estimated_cost_usd=estimate)
    _live[:] = [summary]
    log.info(
        "%s: %d request(s), %d cached, estimated cost $%.3f", run_key, len(rows), cached, estimate
    )
    if dry_run:
        return Completed(
            data=summary, message=f"dry run: ${estimate:.3f} for {len(rows) - cached} request(s)"
        )
    if max_cost is not None and estimate > max_cost:
        from prefect_gptimage.reporting.events import spend_refused

        spend_refused(
            run_key, estimate=estimate, max_cost=max_cost, requests=len(rows), cached=cached
        )
        return Failed(
            data=summary,
            message=f"estimated cost ${estimate:.3f} exceeds max_cost ${max_cost:.3f}: "
            "nothing submitted",
        )
    if cluster:
        check_cluster(cluster, log)  # reachable, with a server the workers share: before paying
    if target is not None:
        probe_bucket(target, s3_client)  # the bucket exists and takes a write: before paying
    out = Path(output_dir or get_settings().output_dir) / run_key
    progress = BatchProgress().start(len(rows), artifact_key(run_key, "progress"))
    last_log = 0.0
    runner: TaskRunner[Any]
    options = GenerationOptions(
        credentials=credentials,
        output_dir=str(out),
        timeout=timeout,
        refresh_cache=refresh,
        resubmit_unknown=resubmit_unknown,
        max_in_flight=concurrency,
        lookahead=lookahead,
    )

    started: dict[int, StartedRow] = {}
    started_lock = threading.Lock()
    over = threading.Event()

    def submit(row: PromptRow) -> Any:
        if stop_requested():  # a stop: nothing new is started (nor paid)
            return SettledRow(
                RowInterrupted(
                    "not started (interrupted): nothing was submitted for it",
                    error_type=NOT_STARTED,
                )
            )
        future = runner.submit(
            generate_and_stage,  # type: ignore[arg-type]  # (overloads favour async tasks)
            parameters={
                "request": row.request,
                "target": target,
                "options": options.model_copy(update={"variant": row.variant}),
                # a row on another process cannot see this flow's client: it gets the block
                **({"bucket_block": bucket} if cluster and isinstance(bucket, S3Bucket) else {}),
            },
        )
        handle = StartedRow(row, future)
        with started_lock:
            started[id(handle)] = handle
        handle.add_done_callback(lambda h: forget_row(started, started_lock, h))
        return handle

    # one fal request id per request: a second row given the same id fails (see _flag_duplicates)
    ledger = RequestIdLedger()
    reported: dict[str, PromptRow] = {}
    # twice the fal cap in workers: while one row downloads and uploads, the next is already at
    # fal; plus the rows already submitted (the CLI's head start, a killed run): resuming them
    # takes no fal slot, so they must not keep the next rows from the freed slots
    _, ahead = local_cap(concurrency, options.lookahead)  # the look-ahead, resolved in one place
    workers = 2 * max(1, concurrency) + ahead + min(plan.at_fal, MAX_RESUMED_AHEAD)
    runner = row_runner(cluster, workers)  # this process's threads, or a Dask cluster
    watcher = threading.Thread(
        target=watch_for_stop, args=(started, started_lock, over), daemon=True
    )
    with (
        use_s3_client(s3_client),
        use_request_id_ledger(ledger),
        RunReport(out, run_key, target, summary) as report,
        _running(runner),
    ):
        watcher.start()
        # rows come back in file order, so the same batch always writes the same manifest; no
        # more rows are handed to the runner than it has workers, so a stop finds none queued
        for row, result in in_order(rows, submit, window=workers, on_finished=progress.advance):
            if isinstance(result, RowOutcome):
                # generate() claims it first when it can: then nothing was staged twice
                with contextlib.suppress(DuplicateRequestId):
                    ledger.claim(result.request_id, row.request, row.variant)
                if ledger.conflicted(result.request_id):
                    report.fail(_duplicate(result.request_id, ledger), row.request, row.line)
                else:
                    report.add(result, row.request.prompt)
                    reported[result.request_id] = row
            else:
                report.fail(
                    result if isinstance(result, BaseException) else RuntimeError(str(result)),
                    row.request,
                    row.line,
                )
            if progress.elapsed - last_log >= LOG_EVERY_S:
                last_log = progress.elapsed
                log.info("%s: %s", run_key, progress.status())  # counts, elapsed, ETA
        over.set()
        progress.finish()
        log.info("%s: %s", run_key, progress.status())
        _flag_duplicates(ledger, reported, report)
        state = report.close()
    # (a function, not the event: the flow function travels to Dask workers, see flows/_fanout)
    if stop_requested():
        message = f"interrupted: {state.message}"
        return Failed(message=message, data=BatchIncomplete(report.summary, message))
    if report.summary.ok:
        return state
    # a plain call raises this exception, and it carries the summary (Failed(data=summary) lost it)
    return Failed(message=state.message, data=BatchIncomplete(report.summary, state.message))


@contextlib.contextmanager
def _running(runner: TaskRunner[Any]) -> Any:
    """The runner, shut down at the end; after a stop, without waiting for rows left in flight
    (their tasks run on until the process exits; what they paid for is cached already)."""
    runner.__enter__()
    try:
        yield runner
    finally:
        executor = getattr(runner, "_executor", None)
        if stop_event.is_set() and executor is not None:
            # no cancel events either: a row in flight keeps going until the process exits
            executor.shutdown(wait=False, cancel_futures=True)
            runner._executor = None  # type: ignore[attr-defined]
        else:
            runner.__exit__(None, None, None)


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
            report.fail(error, row.request, row.line)
