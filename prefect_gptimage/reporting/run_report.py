"""How every pipeline ends: manifest and HTML gallery written, artifacts published, final state.

A :class:`RunReport` takes a run's outcomes as they arrive and writes each image's manifest line
and gallery figure to disk at once, so a 10,000-row batch holds no more in memory than a
10-row one: only the totals, the first :data:`SUMMARY_IMAGES` image records (for the summary),
the first :data:`TABLE_ROWS` staged images (for the results table) and the failures.

A run whose requests all produced images ends Completed; one with any failure ends Failed, and
either way its state carries the :class:`RunSummary` (the CLI prints it; ``--json`` as one line).

It also tells Prefect: each staged image is announced with a ``prefect-gptimage.image.staged``
event and materialized as an asset keyed by its ``s3://`` URI, and :meth:`RunReport.close`
materializes the staged manifest and emits ``prefect-gptimage.batch.completed`` (see
:mod:`~prefect_gptimage.reporting.events` and :mod:`~prefect_gptimage.reporting.assets`). Both
are best effort: they never fail the run.

A run through the OCR quality gate passes each image's verdict to :meth:`RunReport.add` (and a
failed row's last verdict to :meth:`RunReport.fail`): it goes into the image's manifest line, its
gallery figure and its row of the results table; a request whose images were all rejected is
added with no images, so the totals still count what it cost. :meth:`RunReport.close` takes a
``note`` for the artifacts (the gate's regenerations and their cost).

Example:
    >>> with RunReport(Path("out/run"), "nightly", target) as report:  # doctest: +SKIP
    ...     report.add(outcome, prompt)
    ...     return report.close()
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from prefect_gptimage._run_context import run_logger
from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.reporting import events
from prefect_gptimage.reporting.artifacts import publish_results
from prefect_gptimage.reporting.assets import ImageAssets, assets_enabled
from prefect_gptimage.reporting.billing import admin_key, reconcile_lines, summary_line
from prefect_gptimage.reporting.gallery import HtmlGallery
from prefect_gptimage.reporting.manifest import (
    ImageLine,
    Manifest,
    ManifestTotals,
    ManifestWriter,
    OcrVerdictRecord,
    cost_per_image,
)
from prefect_gptimage.reporting.summary import Failure, RunSummary
from prefect_gptimage.s3 import S3Target, StagedImage, manifest_key, stage_file
from prefect_gptimage.schemas import AnyRequest
from prefect_gptimage.tasks.rows import RowOutcome

logger = logging.getLogger(__name__)

#: The summary lists at most this many images (the manifest lists them all).
SUMMARY_IMAGES = 1000
#: The results table artifact shows at most this many images (the manifest lists them all).
TABLE_ROWS = 2000


def finish(summary: RunSummary) -> State[RunSummary]:
    """The flow's final state: Failed (carrying the summary) when any request failed."""
    if summary.ok:
        return Completed(data=summary)
    return Failed(message=f"{len(summary.failures)} request(s) failed", data=summary)


def paid_note(outcome: RowOutcome) -> str | None:
    """What a row that paid for more than one request says (manifest line, summary image)."""
    if not outcome.also_paid:
        return None
    return (
        f"paid for {outcome.paid_requests} requests: an earlier submit of this request (its "
        "outcome unknown, sent again with resubmit_unknown, or its result expired at fal) is "
        "counted as paid too"
    )


class RunReport:
    """Collects a run's outcomes in bounded memory; :meth:`close` settles the final state.

    ``out`` receives ``manifest.jsonl`` and ``index.html``; with a ``target`` the manifest is
    staged to S3 and the results table and gallery artifacts are published. Used as a context
    manager, an exception inside the block discards the unfinished files.
    """

    def __init__(
        self,
        out: Path,
        run_key: str,
        target: S3Target | None,
        summary: RunSummary | None = None,
        admin_key: str | None = None,
    ) -> None:
        self.out, self.run_key, self.target = out, run_key, target
        self.admin_key = admin_key  # fal's admin key (else FAL_ADMIN_KEY): the bill reconciled
        # the estimate made before submitting (a batch's plan), for batch.completed
        self._planned = summary.estimated_cost_usd if summary is not None else None
        self.summary = summary or RunSummary()
        self.summary.estimated_cost_usd = 0.0  # from here on: what this run actually paid
        self.manifest = ManifestWriter(out / "manifest.jsonl")
        self.gallery = HtmlGallery(out / "index.html", title=run_key)
        self._table: list[StagedImage] = []
        self._requests: dict[str, AnyRequest] = {}
        self._verdicts: dict[tuple[str, int], OcrVerdictRecord] = {}  # the table's, gated runs
        self._closed = False
        self._cached = 0  # requests served from the cache
        self._paid: set[str] = set()  # request ids this run paid for (their bill: the summary's)
        self._events = events.events_enabled()
        self._manifest_uri = (
            f"s3://{target.bucket}/{manifest_key(target, run_key)}" if target is not None else None
        )
        self._assets = (
            ImageAssets(target.bucket, run_key, self._manifest_uri)
            if target is not None and assets_enabled()
            else None
        )

    def add(
        self,
        outcome: RowOutcome,
        prompt: str,
        ocr: Sequence[OcrVerdictRecord] | None = None,
    ) -> None:
        """One request's images: manifest lines, gallery figures, totals.

        ``ocr``: the OCR gate's verdict on each of ``outcome.images``, in the same order (a gated
        run); an outcome with no images still counts its request (submitted or cached, cost).
        """
        if ocr is not None and len(ocr) != len(outcome.images):
            raise ValueError(f"{len(ocr)} OCR verdicts for {len(outcome.images)} images")
        verdicts = list(ocr) if ocr is not None else [None] * len(outcome.images)
        summary = self.summary
        summary.submitted += outcome.paid_requests
        summary.images_total += len(outcome.images)
        summary.staged += len(outcome.staged)
        summary.estimated_cost_usd = round(summary.estimated_cost_usd + outcome.cost, 6)
        note = paid_note(outcome)
        room = SUMMARY_IMAGES - len(summary.images)
        if room > 0:
            records = outcome.image_records()[:room]
            summary.images.extend(r | {"note": note} if note else r for r in records)
        for staged, verdict in zip(outcome.staged, verdicts, strict=False):
            self.manifest.add_image(staged, prompt, outcome.request, ocr=verdict, note=note)
        if len(self._table) < TABLE_ROWS and outcome.staged:
            shown = outcome.staged[: TABLE_ROWS - len(self._table)]
            self._table.extend(shown)
            self._requests[outcome.request_id] = outcome.request
            for staged, verdict in zip(shown, verdicts, strict=False):
                if verdict is not None:
                    self._verdicts[(staged.request_id, staged.index)] = verdict
        for image, verdict in zip(outcome.images, verdicts, strict=True):
            self.gallery.add_image(image, prompt, outcome.request, ocr=verdict)
        self._cached += outcome.from_cache
        if not outcome.from_cache:
            self._paid.add(outcome.request_id)
        if outcome.staged and (self._events or self._assets is not None):
            self._announce(outcome, prompt)

    def _announce(self, outcome: RowOutcome, prompt: str) -> None:
        """image.staged events and assets for a request's staged images (never raises)."""
        try:
            cost = cost_per_image(outcome.request)
            for staged in outcome.staged:
                if self._events:
                    events.image_staged(
                        staged,
                        cost=cost,
                        cached=outcome.from_cache,
                        manifest_uri=self._manifest_uri,
                        run_key=self.run_key,
                    )
                if self._assets is not None:
                    self._assets.add(staged, outcome.request, prompt, cached=outcome.from_cache)
        except Exception as exc:
            events.warn_once("report staged images to Prefect", exc)

    def fail(
        self,
        exc: BaseException,
        request: AnyRequest,
        line: int | None = None,
        ocr: OcrVerdictRecord | None = None,
    ) -> None:
        """A request that produced no image: in the summary, the manifest and the gallery.

        ``ocr``: a gated row's last verdict, kept on its manifest line.
        """
        failure = Failure.from_exception(exc, request, line)
        self.summary.failures.append(failure)
        if failure.paid:  # fal accepted (and bills) it before the row failed: still paid
            if failure.request_id:
                self._paid.add(failure.request_id)
            self.summary.submitted += 1
            self.summary.estimated_cost_usd = round(
                self.summary.estimated_cost_usd + estimate_cost(request), 6
            )
        self.manifest.add_failure(
            failure.prompt,
            request,
            reason=failure.reason,
            request_id=failure.request_id,
            error_type=failure.error_type,
            ocr=ocr,
        )
        self.gallery.add_failure(failure)

    def salvage(self) -> None:
        """Put the manifest written so far in place (never raises): what a process that must
        exit before :meth:`close` (a stop's hard deadline) leaves behind. Nothing is staged."""
        with contextlib.suppress(Exception):
            self.manifest.close()

    def close(self, note: str | None = None, stopped: bool = False) -> State[RunSummary]:
        """Finish the files, stage the manifest, publish the artifacts; the run's final state.

        ``note``: one sentence of plain text for the artifacts (see
        :func:`~prefect_gptimage.reporting.artifacts.publish_results`). ``stopped``: a stop cut
        the run short and the process has seconds left: the manifest's asset (a task run of its
        own) is not materialized; the manifest, the artifacts and the event are.
        """
        summary = self.summary
        summary.gallery = str(self.gallery.close())
        manifest_path = self.manifest.close()
        self._closed = True
        totals, billed = self._reconcile(manifest_path)
        if self.target is None:
            summary.manifest_uri = str(manifest_path)
            self._completed(manifest_path.resolve().as_uri())
            return finish(summary)
        staged_manifest = stage_file(
            manifest_path,
            manifest_key(self.target, self.run_key),
            "application/x-ndjson",
            self.target,
        )
        summary.manifest_uri = staged_manifest.s3_uri
        publish_results(
            self._table,
            summary.failures,
            key_prefix=self.run_key,
            requests=self._requests,
            totals=totals,
            manifest_uri=staged_manifest.s3_uri,
            verdicts=self._verdicts,
            note=note,
            billed=billed,
        )
        if self._assets is not None and not stopped:  # a stopped run leaves promptly
            counts = totals.model_dump()
            self._assets.manifest(staged_manifest.s3_uri, {**counts, "staged": summary.staged})
        self._completed(staged_manifest.s3_uri)
        return finish(summary)

    def _completed(self, manifest_uri: str) -> None:
        """``prefect-gptimage.batch.completed`` for this run (never raises)."""
        if not self._events:
            return
        summary = self.summary
        events.batch_completed(
            manifest_uri,
            {
                "run_key": self.run_key,
                "images": summary.images_total,
                "staged": summary.staged,
                "failed": len(summary.failures),
                "submitted": summary.submitted,
                "cached": self._cached,
                "estimated_cost_usd": self._planned,
                "cost_usd": summary.estimated_cost_usd,
                "billed_cost_usd": summary.billed_cost_usd,  # None: no admin key, estimates
                "costs": summary.costs,
                "ok": summary.ok,
            },
        )

    def _reconcile(self, path: Path) -> tuple[ManifestTotals, dict[str, float] | None]:
        """With an admin key: fal's bill into the manifest at ``path`` and the summary (see
        :mod:`~prefect_gptimage.reporting.billing`); the totals, and each request's billed cost
        per image. Without one, or when fal's billing events cannot be read: the estimates."""
        key = admin_key(self.admin_key)
        if key is None:
            return self.manifest.totals(), None
        try:
            rec = reconcile_lines(Manifest.from_jsonl(path).lines, key)
        except Exception as exc:  # the images are made: a bill unread fails no run
            run_logger(logger).warning(
                "fal's billing events not read (%s): costs are estimates", exc
            )
            return self.manifest.totals(), None
        reconciled = Manifest(rec.lines)
        reconciled.write(path)
        summary = self.summary
        # what fal billed for what this run paid (as cost_usd is the estimate of that); the
        # manifest's totals bill every row, earlier runs' too
        summary.billed_cost_usd = round(sum(rec.billed.get(r, 0.0) for r in self._paid), 6)
        summary.costs = "billed"
        summary.cost_differences = [str(d) for d in rec.differences]
        summary.not_billed_yet = list(rec.waiting)
        totals = reconciled.totals()
        run_logger(logger).info(
            "%s: %s", self.run_key, summary_line(rec, totals.estimated_cost_usd)
        )
        for difference in rec.differences[:20]:
            run_logger(logger).warning("bill differs from the estimate: %s", difference)
        per_image = {
            ln.request_id: ln.billed_cost_usd
            for ln in rec.lines
            if isinstance(ln, ImageLine) and ln.billed_cost_usd is not None
        }
        return totals, per_image

    def __enter__(self) -> RunReport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._closed:
            self.manifest.discard()
            self.gallery.discard()
