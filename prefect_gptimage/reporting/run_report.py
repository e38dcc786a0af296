"""How every pipeline ends: manifest and HTML gallery written, artifacts published, final state.

A :class:`RunReport` takes a run's outcomes as they arrive and writes each image's manifest line
and gallery figure to disk at once, so a 10,000-row batch holds no more in memory than a
10-row one: only the totals, the first :data:`SUMMARY_IMAGES` image records (for the summary),
the first :data:`TABLE_ROWS` staged images (for the results table) and the failures.

A run whose requests all produced images ends Completed; one with any failure ends Failed, and
either way its state carries the :class:`RunSummary` (the CLI prints it; ``--json`` as one line).

Example:
    >>> with RunReport(Path("out/run"), "nightly", target) as report:  # doctest: +SKIP
    ...     report.add(outcome, prompt)
    ...     return report.close()
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from prefect_gptimage.reporting.artifacts import publish_results
from prefect_gptimage.reporting.gallery import HtmlGallery
from prefect_gptimage.reporting.manifest import ManifestWriter
from prefect_gptimage.reporting.summary import Failure, RunSummary
from prefect_gptimage.s3 import S3Target, StagedImage, manifest_key, stage_file
from prefect_gptimage.schemas import AnyRequest
from prefect_gptimage.tasks.rows import RowOutcome

#: The summary lists at most this many images (the manifest lists them all).
SUMMARY_IMAGES = 1000
#: The results table artifact shows at most this many images (the manifest lists them all).
TABLE_ROWS = 2000


def finish(summary: RunSummary) -> State[RunSummary]:
    """The flow's final state: Failed (carrying the summary) when any request failed."""
    if summary.ok:
        return Completed(data=summary)
    return Failed(message=f"{len(summary.failures)} request(s) failed", data=summary)


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
    ) -> None:
        self.out, self.run_key, self.target = out, run_key, target
        self.summary = summary or RunSummary()
        self.summary.estimated_cost_usd = 0.0  # from here on: what this run actually paid
        self.manifest = ManifestWriter(out / "manifest.jsonl")
        self.gallery = HtmlGallery(out / "index.html", title=run_key)
        self._table: list[StagedImage] = []
        self._requests: dict[str, AnyRequest] = {}
        self._closed = False

    def add(self, outcome: RowOutcome, prompt: str) -> None:
        """One request's images: manifest lines, gallery figures, totals."""
        summary = self.summary
        summary.submitted += not outcome.from_cache
        summary.images_total += len(outcome.images)
        summary.staged += len(outcome.staged)
        summary.estimated_cost_usd = round(summary.estimated_cost_usd + outcome.cost, 6)
        room = SUMMARY_IMAGES - len(summary.images)
        if room > 0:
            summary.images.extend(outcome.image_records()[:room])
        for staged in outcome.staged:
            self.manifest.add_image(staged, prompt, outcome.request)
        if len(self._table) < TABLE_ROWS and outcome.staged:
            self._table.extend(outcome.staged[: TABLE_ROWS - len(self._table)])
            self._requests[outcome.request_id] = outcome.request
        for image in outcome.images:
            self.gallery.add_image(image, prompt, outcome.request)

    def fail(self, exc: BaseException, request: AnyRequest, line: int | None = None) -> None:
        """A request that produced no image: in the summary, the manifest and the gallery."""
        failure = Failure.from_exception(exc, request, line)
        self.summary.failures.append(failure)
        self.manifest.add_failure(
            failure.prompt,
            request,
            reason=failure.reason,
            request_id=failure.request_id,
            error_type=failure.error_type,
        )
        self.gallery.add_failure(failure)

    def close(self) -> State[RunSummary]:
        """Finish the files, stage the manifest, publish the artifacts; the run's final state."""
        summary = self.summary
        summary.gallery = str(self.gallery.close())
        manifest_path = self.manifest.close()
        self._closed = True
        if self.target is None:
            summary.manifest_uri = str(manifest_path)
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
            totals=self.manifest.totals(),
            manifest_uri=staged_manifest.s3_uri,
        )
        return finish(summary)

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
