"""``batch_to_s3``: a prompt file (JSONL or CSV) in, images in S3 with a manifest out.

One request per row, each row one task run named after it (``row 7: a kite above a beach``), run
by the row engine (:mod:`prefect_gptimage.engine`) under a concurrency cap through a bounded
window (twice the cap in flight, results back in file order), and reported as it goes: each
image's manifest line and gallery figure go to disk at once, so a 10,000-row file never becomes
one giant flow state. Every row is validated before
anything is paid for; ``dry_run`` prints the estimated cost and submits nothing; ``max_cost``
refuses a batch whose uncached rows would cost more (cached rows are free). Running the same
batch again submits nothing and writes no duplicate object; a batch killed half way resumes
where it was.

**Stopping.** ``stop=`` takes a :class:`~prefect_gptimage.engine.stop.Stop`; its
``request(reason)`` (the CLI calls it on SIGTERM or SIGINT) stops the batch from starting rows:
rows not started are reported "not started (interrupted)". Rows already started get
``stop.grace`` seconds to finish; those still waiting on fal then are reported "in flight
(interrupted)" once their submit has been recorded (never in the middle of one), and left
running at fal: nothing is cancelled, and a re-run resumes them from the cache without paying
again. The run then ends Failed with the summary of what was staged. ``stop.summary`` is the
batch's live summary from its start, for a process that must exit before the flow returns.

**Cancelling.** Cancelling the flow run through Prefect (the UI's Cancel button, ``prefect
flow-run cancel``, the API) is such a stop, noticed within two seconds
(:mod:`prefect_gptimage.engine.cancel`); besides, requests still waiting in fal's queue are
cancelled there (nothing was paid for them; a re-run submits them). The manifest and summary
are written and the run ends Cancelled, carrying the summary as above.

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

from functools import partial
from typing import Any

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.logging import get_run_logger
from prefect.states import Completed, Failed
from prefect_aws import S3Bucket

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.engine.budget import refuse_over_budget
from prefect_gptimage.engine.options import RunOptions
from prefect_gptimage.engine.plan import plan_cost as plan_cost  # re-exported
from prefect_gptimage.engine.plan import plan_rows
from prefect_gptimage.engine.run import RowEngine, stopped_state
from prefect_gptimage.engine.stop import Stop
from prefect_gptimage.errors import BatchIncomplete
from prefect_gptimage.flows._fanout import check_cluster, row_runner
from prefect_gptimage.flows._preflight import check_budget, check_lock_service, preflight_bucket
from prefect_gptimage.prompts import PromptRow, load_prompt_file, run_key_for, unique_rows
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.reporting.wording import counted, dry_run_message
from prefect_gptimage.s3 import S3Target
from prefect_gptimage.s3.preflight import probe_bucket
from prefect_gptimage.tasks.generate import GenerationOptions
from prefect_gptimage.tasks.rows import generate_and_stage

__all__ = ["batch_to_s3", "plan_cost", "plan_rows"]


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
    stop: Stop | None = None,
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

    ``stop``: a :class:`~prefect_gptimage.engine.stop.Stop` to stop the batch from outside (see
    the module docs, "Stopping").
    """
    log = get_run_logger()
    max_cost = check_budget(max_cost)
    rows = unique_rows(load_prompt_file(prompt_file, defaults))
    target, s3_client = preflight_bucket(
        bucket, prefix, presign_expires=presign_expires, probe=False
    )
    check_lock_service()  # a Redis lock that refuses us: one line, before anything is paid
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
        cluster=cluster,
    )
    run_key = run_key_for(prompt_file, defaults)
    plan = plan_rows(rows, resubmit_unknown=resubmit_unknown, refresh=refresh)
    summary = RunSummary(estimated_cost_usd=plan.cost)
    engine = RowEngine(
        options, run_key, target, s3_client, summary, partial(row_runner, cluster), stop
    )
    log.info(
        "%s: %s, %d cached, estimated cost $%.3f",
        run_key,
        counted(len(rows), "request"),
        plan.cached,
        plan.cost,
    )
    if dry_run:
        return Completed(data=summary, message=dry_run_message(plan.cost, len(rows), plan.cached))
    refused = refuse_over_budget(run_key, plan, len(rows), max_cost, summary)
    if refused is not None:
        return refused
    if cluster:
        check_cluster(cluster, log)  # reachable, with a server the workers share: before paying
    if target is not None:
        probe_bucket(target, s3_client)  # the bucket exists and takes a write: before paying
    generation = options.generation(str(engine.out), engine.stop)
    result = engine.run(
        rows, generate_and_stage, partial(_row_parameters, target, generation, options)
    )
    state, summary = result.state, result.summary
    if result.interrupted:
        return stopped_state(result)  # Failed, or Cancelled when Prefect cancelled the run
    if summary.ok:
        return state
    # a plain call raises this exception, and it carries the summary (Failed(data=summary) lost it)
    return Failed(message=state.message, data=BatchIncomplete(summary, state.message))


def _row_parameters(
    target: S3Target | None, generation: GenerationOptions, options: RunOptions, row: PromptRow
) -> dict[str, Any]:
    """The row task's parameters for ``row``."""
    return {
        "request": row.request,
        "target": target,
        "options": generation.model_copy(update={"variant": row.variant}),
        "line": row.line,
        # a row on another process cannot see this flow's client: it gets the block
        **(
            {"bucket_block": options.bucket}
            if options.cluster and isinstance(options.bucket, S3Bucket)
            else {}
        ),
    }
