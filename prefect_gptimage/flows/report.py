"""How every pipeline ends: manifest and HTML gallery written, artifacts published, final state.

A run whose requests all produced images ends Completed; one with any failure ends Failed, and
either way its state carries the :class:`RunSummary` (the CLI prints it; ``--json`` as one line).
"""

from __future__ import annotations

from pathlib import Path

from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from prefect_gptimage.artifacts import publish_results, write_html_gallery
from prefect_gptimage.flows.rows import RowOutcome
from prefect_gptimage.flows.summary import Failure, RunSummary
from prefect_gptimage.manifest import Manifest
from prefect_gptimage.s3 import S3Target, manifest_key, stage_file
from prefect_gptimage.schemas import AnyRequest

#: The summary lists at most this many images (the manifest lists them all).
SUMMARY_IMAGES = 1000


def finish(summary: RunSummary) -> State[RunSummary]:
    """The flow's final state: Failed (carrying the summary) when any request failed."""
    if summary.ok:
        return Completed(data=summary)
    return Failed(message=f"{len(summary.failures)} request(s) failed", data=summary)


def record(manifest: Manifest, outcome: RowOutcome, prompt: str) -> None:
    """Add one request's staged images to the manifest."""
    for staged in outcome.staged:
        manifest.add_image(staged, prompt, outcome.request)


def record_failure(
    manifest: Manifest, summary: RunSummary, exc: BaseException, request: AnyRequest
) -> None:
    """Note a request that produced no image, with its reason, in the summary and the manifest."""
    arguments = request.to_arguments()
    failure = Failure.from_exception(exc, arguments, request.endpoint)
    summary.failures.append(failure)
    manifest.add_failure(
        failure.prompt,
        arguments,
        reason=failure.reason,
        endpoint=failure.endpoint,
        request_id=failure.request_id,
        error_type=failure.error_type,
    )


def wrap_up(
    summary: RunSummary,
    outcomes: list[RowOutcome],
    manifest: Manifest,
    out: Path,
    run_key: str,
    target: S3Target | None,
) -> State[RunSummary]:
    """Write the manifest and gallery, publish artifacts, and settle the flow's final state."""
    out.mkdir(parents=True, exist_ok=True)
    summary.submitted = sum(1 for o in outcomes if not o.from_cache)
    summary.images_total = sum(len(o.images) for o in outcomes)
    summary.staged = sum(len(o.staged) for o in outcomes)
    summary.estimated_cost_usd = round(sum(o.cost for o in outcomes), 6)
    summary.images = [rec for o in outcomes for rec in o.image_records()][:SUMMARY_IMAGES]
    gallery = write_html_gallery(
        [img for o in outcomes for img in o.images],
        out / "index.html",
        title=run_key,
        prompts={o.request_id: str(o.request.get("prompt", "")) for o in outcomes},
        failures=summary.failures,
    )
    summary.gallery = str(gallery)
    manifest_path = manifest.write(out / "manifest.jsonl")
    if target is not None:
        staged_manifest = stage_file(
            manifest_path, manifest_key(target, run_key), "application/x-ndjson", target
        )
        summary.manifest_uri = staged_manifest.s3_uri
        publish_results(
            [s for o in outcomes for s in o.staged],
            summary.failures,
            key_prefix=run_key,
            requests={o.request_id: o.request for o in outcomes},
        )
    else:
        summary.manifest_uri = str(manifest_path)
    return finish(summary)
