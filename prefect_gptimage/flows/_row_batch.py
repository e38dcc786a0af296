"""The body every batch-shaped flow shares once its rows are read: plan, budget, run, report.

``batch_to_s3`` (a prompt file) and ``edit_folder_to_s3`` (a folder or an S3 prefix of images)
differ only in where their rows come from; from there on both go through :func:`run_rows`: the
plan and its cost, the dry run, ``max_cost``, the cluster and bucket checks before paying, then
the row engine (:class:`~prefect_gptimage.engine.run.RowEngine`: window, budget, stop, resume,
manifest, gallery, artifacts, events) with one
:func:`~prefect_gptimage.tasks.rows.generate_and_stage` task run per row.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from prefect.client.schemas.objects import State
from prefect.logging import get_run_logger
from prefect.states import Completed, Failed
from prefect_aws import S3Bucket

from prefect_gptimage.engine.budget import held_back_message, refuse_over_budget
from prefect_gptimage.engine.options import RunOptions
from prefect_gptimage.engine.plan import plan_rows
from prefect_gptimage.engine.run import RowEngine, stopped_state
from prefect_gptimage.engine.stop import Stop
from prefect_gptimage.engine.suspend import suspend_in_waves
from prefect_gptimage.errors import BatchIncomplete
from prefect_gptimage.flows._edit_inputs import fresh_links
from prefect_gptimage.flows._fanout import check_cluster, row_runner
from prefect_gptimage.inputs import InputResolver
from prefect_gptimage.prompts import PromptRow
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.reporting.wording import counted, dry_run_message
from prefect_gptimage.s3 import S3Target
from prefect_gptimage.s3.preflight import probe_bucket
from prefect_gptimage.schemas import AnyRequest
from prefect_gptimage.tasks.options import GenerationOptions
from prefect_gptimage.tasks.prices import load_prices
from prefect_gptimage.tasks.rows import generate_and_stage

__all__ = ["run_rows"]


def run_rows(
    rows: list[PromptRow],
    run_key: str,
    options: RunOptions,
    target: S3Target | None,
    s3_client: Any,
    *,
    dry_run: bool = False,
    stop: Stop | None = None,
    resolver: InputResolver | None = None,
    suspend: bool = False,
) -> State[RunSummary]:
    """Plan, check and run ``rows`` (validated, inputs resolved) as one batch: the flow's final
    state (see ``batch_to_s3``'s docs for what it carries). ``resolver``: signs each row's
    staged inputs anew as the row starts. ``suspend``: a deployment run with webhooks on may
    suspend while fal runs each wave of its rows (:mod:`prefect_gptimage.engine.suspend`)."""
    log = get_run_logger()
    load_prices(options.credentials, log)  # fal's prices, once, before planning
    plan = plan_rows(rows, resubmit_unknown=options.resubmit_unknown, refresh=options.refresh)
    summary = RunSummary(estimated_cost_usd=plan.cost)
    engine = RowEngine(
        options, run_key, target, s3_client, summary, partial(row_runner, options.cluster), stop
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
    refused = refuse_over_budget(run_key, plan, len(rows), options.max_cost, summary)
    if refused is not None:
        return refused
    if options.cluster:
        check_cluster(options.cluster, log)  # reachable, with a server the workers share
    if target is not None:
        probe_bucket(target, s3_client)  # the bucket exists and takes a write: before paying
    generation = options.generation(str(engine.out), engine.stop)
    if suspend:  # ends the process while fal works, when it may; resumed, goes on from here
        waves = suspend_in_waves(rows, options, generation, partial(_request_of, resolver))
        generation = generation.model_copy(update={"paid_in_run": waves.paid})
        summary.estimated_cost_usd += waves.earlier_cost  # paid before it suspended: not cached
    result = engine.run(
        rows, generate_and_stage, partial(_row_parameters, target, generation, options, resolver)
    )
    state, summary = result.state, result.summary
    if result.interrupted:
        return stopped_state(result)  # Failed, or Cancelled when Prefect cancelled the run
    if summary.ok:
        return state
    message = held_back_message(summary) or state.message  # rows the fleet budget held back
    # a plain call raises this exception, and it carries the summary (Failed(data=summary) lost it)
    return Failed(message=message, data=BatchIncomplete(summary, message))


def _request_of(resolver: InputResolver | None, row: PromptRow) -> AnyRequest:
    """The request ``row`` submits, its staged inputs' links signed anew."""
    return fresh_links(resolver, row).request


def _row_parameters(
    target: S3Target | None,
    generation: GenerationOptions,
    options: RunOptions,
    resolver: InputResolver | None,
    row: PromptRow,
) -> dict[str, Any]:
    """The row task's parameters for ``row`` (called as the row starts)."""
    row = fresh_links(resolver, row)
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
