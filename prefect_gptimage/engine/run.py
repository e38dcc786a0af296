"""The row engine: a run's rows through a task runner, in a bounded window, into one report.

Every flow that runs many rows (``batch_to_s3``, ``ocr_gated_batch``) goes through
:class:`RowEngine`. The flow reads and validates its file, checks what must hold before anything
is paid (bucket, cluster: the flows' preflight), plans (:mod:`prefect_gptimage.engine.plan`) and
checks ``max_cost`` (:mod:`prefect_gptimage.engine.budget`); the engine then runs one task run
per row (the flow's row task, e.g. :func:`~prefect_gptimage.tasks.rows.generate_and_stage`):

* **window**: at most twice the fal cap plus the look-ahead rows in flight
  (:func:`~prefect_gptimage.tasks.window.in_order`), the next row started the moment one
  finishes, results back in file order, so the same file always writes the same manifest;
* **ledger**: one fal request id, one row (:class:`~prefect_gptimage.ledger.RequestIdLedger`);
  rows reported before a later row claimed their id are failed at the end;
* **report**: each row into a :class:`~prefect_gptimage.reporting.run_report.RunReport` as it
  arrives (manifest line, gallery figure), progress artifact and progress logs every
  :data:`LOG_EVERY_S`, then the report closed (manifest staged, artifacts, events);
* **stop**: the :class:`~prefect_gptimage.engine.stop.Stop` passed in (see
  :mod:`prefect_gptimage.engine.settle`); ``stop.summary`` is the live summary from the start, so
  a process that must exit early can print it. A cancel of the flow run through Prefect is a
  stop too (:mod:`prefect_gptimage.engine.cancel`): the run's state is watched while it runs.
  After a stop the runner is shut down without waiting for the rows left in flight (their task
  runs go on until the process exits; what they paid for is cached already).

Run state lives in the engine object and the objects passed in, never in module globals.

Example:
    >>> engine = RowEngine(options, run_key, target, s3_client, summary, runner)  # doctest: +SKIP
    >>> result = engine.run(rows, generate_and_stage, parameters, report_outcome)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from prefect import Task
from prefect.client.schemas.objects import State
from prefect.logging import get_run_logger
from prefect.states import Cancelled, Failed
from prefect.task_runners import TaskRunner

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.engine.cancel import CancelWatch, cancel_if_queued, run_beside_sigterm
from prefect_gptimage.engine.options import RunOptions
from prefect_gptimage.engine.settle import SettledRow, StartedRow, StartedRows, not_started
from prefect_gptimage.engine.stop import Stop
from prefect_gptimage.errors import BatchIncomplete, DuplicateRequestId, FalError
from prefect_gptimage.ledger import RequestIdLedger, use_request_id_ledger
from prefect_gptimage.prompts import PromptRow
from prefect_gptimage.reporting.artifacts import BatchProgress, artifact_key
from prefect_gptimage.reporting.run_report import RunReport
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.s3 import S3Target
from prefect_gptimage.s3.clients import use_s3_client
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.callbacks import count_swept
from prefect_gptimage.tasks.concurrency import local_cap
from prefect_gptimage.tasks.rows import RowOutcome
from prefect_gptimage.tasks.window import in_order

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = [
    "LOG_EVERY_S",
    "ReportRow",
    "RowEngine",
    "RunResult",
    "report_outcome",
    "run_dir",
    "stopped_state",
]

#: How often (seconds) the engine logs its progress and ETA.
LOG_EVERY_S = 15.0

#: How a flow reports one row's result (its row task's return value, or the exception it failed
#: with) into the run: returns the fal request ids it reported as done, for the ledger's check.
ReportRow = Callable[[RunReport, RequestIdLedger, PromptRow, Any], list[str]]


class RunResult(NamedTuple):
    """How a run ended: the report's final state, its summary, and whether a stop cut it short."""

    state: State[Any]
    summary: RunSummary
    interrupted: bool
    cancelled: bool = False  # the stop was Prefect cancelling the flow run


def stopped_state(result: RunResult) -> State[Any]:
    """The flow's final state after a stop cut its run short, carrying a
    :class:`~prefect_gptimage.errors.BatchIncomplete` with the summary (a plain call raises it):
    Cancelled when Prefect cancelled the run (a cancelling run accepts no other final state),
    else Failed."""
    summary = result.summary
    if result.cancelled:
        message = (
            f"cancelled: {summary.staged or summary.images_total} image(s) done, "
            f"{len(summary.failures)} row(s) not; nothing more is submitted, and a re-run "
            "finishes the rest without paying twice"
        )
        return Cancelled(message=message, data=BatchIncomplete(summary, message))
    message = f"interrupted: {result.state.message}"
    return Failed(message=message, data=BatchIncomplete(summary, message))


def run_dir(options: RunOptions, run_key: str) -> Path:
    """The run's local folder: ``output_dir`` (or the setting) / ``run_key``."""
    return Path(options.output_dir or get_settings().output_dir) / run_key


def report_outcome(
    report: RunReport, ledger: RequestIdLedger, row: PromptRow, result: Any
) -> list[str]:
    """A plain row's result into the report: a :class:`RowOutcome`, or the row's failure."""
    if not isinstance(result, RowOutcome):
        error = result if isinstance(result, BaseException) else RuntimeError(str(result))
        report.fail(error, row.request, row.line)
        return []
    # generate() claims it first when it can (not on a cluster): then nothing was staged twice
    with contextlib.suppress(DuplicateRequestId):
        ledger.claim(result.request_id, row.request, row.variant)
    if ledger.conflicted(result.request_id):
        error = _duplicate(result.request_id, ledger)
        error.paid = not result.from_cache  # fal accepted this row's request: still paid
        report.fail(error, row.request, row.line)
        return []
    report.add(result, row.request.prompt)
    return [result.request_id]


class RowEngine:
    """One run of rows (see the module docs). ``runner(max_workers)`` makes its task runner:
    this process's threads, or a cluster's (``flows/_fanout.row_runner``)."""

    def __init__(
        self,
        options: RunOptions,
        run_key: str,
        target: S3Target | None,
        s3_client: S3Client | None,
        summary: RunSummary,
        runner: Callable[[int], TaskRunner[Any]],
        stop: Stop | None = None,
    ) -> None:
        self.options, self.run_key, self.target = options, run_key, target
        self.s3_client = s3_client
        self.summary = summary
        self.stop = stop if stop is not None else Stop()
        self.stop.summary = summary  # live from here on: the CLI prints it on a hard exit
        self.out = run_dir(options, run_key)
        self._runner = runner

    @property
    def workers(self) -> int:
        """Rows in flight at most: twice the fal cap (while one row downloads and uploads, the
        next is already at fal), plus the look-ahead queued at fal."""
        _, ahead = local_cap(self.options.concurrency, self.options.lookahead)
        return 2 * max(1, self.options.concurrency) + ahead

    def run(
        self,
        rows: Sequence[PromptRow],
        row_task: Task[..., Any],
        parameters: Callable[[PromptRow], dict[str, Any]],
        report_row: ReportRow = report_outcome,
        finish: Callable[[], str | None] | None = None,
    ) -> RunResult:
        """Run ``row_task`` once per row (``parameters(row)``), report each result in file order
        with ``report_row``, then close the report (``finish()``, called first, gives its note).
        In a deployment run, beside Prefect's SIGTERM handling
        (:func:`~prefect_gptimage.engine.cancel.run_beside_sigterm`).
        """
        log = get_run_logger()
        return run_beside_sigterm(
            self.stop,
            partial(self._run, rows, row_task, parameters, report_row, finish),
            lambda result: log.warning("%s", stopped_state(result).message),
        )

    def _run(
        self,
        rows: Sequence[PromptRow],
        row_task: Task[..., Any],
        parameters: Callable[[PromptRow], dict[str, Any]],
        report_row: ReportRow,
        finish: Callable[[], str | None] | None,
    ) -> RunResult:
        log = get_run_logger()
        progress = BatchProgress().start(len(rows), artifact_key(self.run_key, "progress"))
        ledger = RequestIdLedger()
        reported: dict[str, PromptRow] = {}
        last_log = 0.0
        creds = self.options.credentials
        with (
            use_s3_client(self.s3_client),
            use_request_id_ledger(ledger),
            RunReport(
                self.out, self.run_key, self.target, self.summary, admin_key=_admin_key(creds)
            ) as report,
            StartedRows(self.stop, partial(cancel_if_queued, credentials=creds)) as started,
            CancelWatch(self.stop),
            self._running() as runner,
        ):
            self.stop.on_hard_exit(report.salvage)  # the manifest so far, on a hard exit

            def submit(row: PromptRow) -> Any:
                if self.stop.requested:  # a stop: nothing new is started (nor paid)
                    return SettledRow(not_started())
                future = runner.submit(row_task, parameters=parameters(row))
                return started.add(StartedRow(row, future))

            # no more rows are handed to the runner than it has workers: a stop finds none queued
            results = in_order(rows, submit, window=self.workers, on_finished=progress.advance)
            for row, result in results:
                for request_id in report_row(report, ledger, row, result):
                    reported[request_id] = row
                if progress.elapsed - last_log >= LOG_EVERY_S:
                    last_log = progress.elapsed
                    log.info("%s: %s", self.run_key, progress.status())  # counts, elapsed, ETA
            progress.finish()
            log.info("%s: %s", self.run_key, progress.status())
            _flag_duplicates(ledger, reported, report)
            if get_settings().webhook_url:  # how many requests waited on callbacks in vain
                self.summary.swept = count_swept(list(reported))
                log.info(
                    "%s: swept %d of %d request(s)", self.run_key, self.summary.swept, len(reported)
                )
            note = finish() if finish is not None else None
            state = report.close(note=note, stopped=self.stop.requested)
        return RunResult(state, report.summary, self.stop.requested, self.stop.cancelled)

    @contextlib.contextmanager
    def _running(self) -> Iterator[TaskRunner[Any]]:
        """The row runner, shut down at the end; after a stop, without waiting for the rows
        left in flight: its (public) shutdown runs in a daemon thread, and those rows' task runs
        go on until they end or the process exits."""
        runner = self._runner(self.workers)
        runner.__enter__()
        try:
            yield runner
        finally:
            if self.stop.requested:
                threading.Thread(
                    target=runner.__exit__,
                    args=(None, None, None),
                    name="gptimage-runner-shutdown",
                    daemon=True,
                ).start()
            else:
                runner.__exit__(None, None, None)


def _admin_key(credentials: FalCredentials | None) -> str | None:
    """fal's admin key of the run's block, else the environment's (the bill reconciled)."""
    return (credentials or FalCredentials()).get_admin_key()


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
