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

from typing import Any

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.logging import get_run_logger
from prefect_aws import S3Bucket

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.engine.options import RunOptions
from prefect_gptimage.engine.plan import plan_cost as plan_cost  # re-exported
from prefect_gptimage.engine.plan import plan_rows as plan_rows  # re-exported
from prefect_gptimage.engine.stop import Stop
from prefect_gptimage.flows._edit_inputs import prepare_inputs, warn_retention
from prefect_gptimage.flows._preflight import check_budget, check_lock_service, preflight_bucket
from prefect_gptimage.flows._row_batch import run_rows
from prefect_gptimage.prompts import load_prompt_file, run_key_for, unique_rows
from prefect_gptimage.reporting.summary import RunSummary

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
    store_io: bool | None = None,
    media_expires: int | None = None,
    input_link_expires: int | None = None,
    budget_wait: float = 0.0,
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

    Edit rows may name local files (relative to the prompt file) and ``s3://`` objects: they are
    read, checked and staged under ``<prefix>/inputs/`` before the first submit (see
    :mod:`prefect_gptimage.inputs`), their links valid ``input_link_expires`` seconds (None:
    ``PREFECT_GPTIMAGE_INPUT_LINK_EXPIRES``). ``store_io=False`` asks fal not to keep the
    requests' payloads; ``media_expires`` is how long fal keeps the images (None: the settings).

    Prices are read from fal once, before planning (:mod:`prefect_gptimage.tasks.prices`). A
    fleet budget (:mod:`prefect_gptimage.tasks.fleet_budget`) that cannot cover a row holds it
    back unpaid (after waiting up to ``budget_wait`` seconds for it to refill); the run goes on
    and ends Failed, listing the rows held back (see :mod:`prefect_gptimage.engine.budget`).
    """
    log = get_run_logger()
    max_cost = check_budget(max_cost)
    rows = load_prompt_file(prompt_file, defaults)
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
        store_io=store_io,
        media_expires=media_expires,
        input_link_expires=input_link_expires,
        budget_wait=budget_wait,
    )
    warn_retention(options, log)
    # edit inputs read, checked and staged before anything is paid: identity is their sha256
    rows, resolver = prepare_inputs(
        rows, str(prompt_file), options, target, s3_client, dry_run=dry_run
    )
    rows = unique_rows(rows)
    run_key = run_key_for(prompt_file, defaults)
    return run_rows(
        rows,
        run_key,
        options,
        target,
        s3_client,
        dry_run=dry_run,
        stop=stop,
        resolver=resolver,
        suspend=True,  # a deployment run with PREFECT_GPTIMAGE_WEBHOOK_SUSPEND: see engine/suspend
    )
