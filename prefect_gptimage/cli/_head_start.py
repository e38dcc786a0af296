"""Head start: submit a batch's first requests while Prefect's temporary API server boots.

Without ``PREFECT_API_URL`` the CLI runs its flow on a temporary API server, which takes ~4 s to
start on a used Prefect home and 7 to 12 s on a fresh one (it creates and migrates its
database). fal could be generating all that time. So, once every check a run makes before paying
has passed (the budget is a finite number, the bucket name is valid and the bucket takes a
write, the fal host is trusted for media, the estimate is within ``--max-cost``), the CLI
submits the first uncached rows itself, as many as the cap has slots (``--concurrency`` plus
``--lookahead``), while the server boots on the other core.

Nothing about what is paid changes. Each of these submits goes through the same client and the
same durable protocol as the submit task (:mod:`prefect_gptimage.tasks.intents`: the intent is
written before the submit, the handle after it), into the same local result store. When the flow
runs, each such row's submit task finds the handle and resumes it ("resuming ...: submitted
while Prefect's API started"), so nothing is submitted twice; a crash in between leaves what
any crash leaves (a re-run resumes it, or reports "outcome unknown"). Each request keeps one of
the cap's local slots from its submit on (:func:`~prefect_gptimage.tasks.concurrency.reserve_slot`),
which its row's task then takes over, so the cap holds throughout.

It is done only where that reasoning holds, and skipped otherwise (the flow then submits as usual):

* the CLI started the temporary API itself (a user's own server answers at once anyway);
* the result store is local (a storage block is loaded through the API);
* no ``PREFECT_GPTIMAGE_LOCK_URL`` (the distributed lock is taken inside Prefect's transaction);
* no Prefect global concurrency limit can apply: the home's database does not exist yet, or has
  no active limit of that name (read-only; an unreadable database counts as "may have one");
* not ``--refresh``, ``--dry-run`` nor ``--cluster``.

Any error in it is logged at debug level and leaves the rest to the flow: it can only make a run
start sooner, never make it fail (the flow repeats every check and reports any failure).
"""

from __future__ import annotations

import argparse
import contextvars
import logging
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from prefect_gptimage.errors import StopBeforeStart

if TYPE_CHECKING:
    from prefect_gptimage.fal.client import FalQueueClient
    from prefect_gptimage.prompts import PromptRow
    from prefect_gptimage.schemas import AnyRequest, RequestHandle

__all__ = ["HEAD_START_NOTE", "head_start", "stop_head_start"]

logger = logging.getLogger("prefect_gptimage.cli.head_start")

#: Kept with each handle, and logged by the submit task that resumes it.
HEAD_START_NOTE = "submitted while Prefect's API started"
_SQLITE_PREFIXES = ("sqlite+aiosqlite:///", "sqlite:///")


def head_start(args: argparse.Namespace, request: AnyRequest | None = None) -> int:
    """Submit a batch's first uncached rows now (see the module docs); how many were sent.

    ``request``: the one request of a ``generate`` command (else the rows of ``args.file``).
    Call it only when the CLI started the temporary API itself, before adopting it.
    """
    try:
        return _head_start(args, request)
    except StopBeforeStart as exc:  # a signal: what was sent is recorded (the pool waited)
        signal_name = str(exc).split(":", 1)[0]
        raise StopBeforeStart(
            f"{signal_name}: stopped during start-up; requests already submitted are recorded "
            "and a re-run resumes them without paying again"
        ) from None
    except Exception as exc:  # the flow repeats every check and reports any failure itself
        logger.debug("no head start: %s", exc, exc_info=True)
        return 0


def _head_start(args: argparse.Namespace, request: AnyRequest | None) -> int:
    if args.refresh or getattr(args, "dry_run", False) or getattr(args, "cluster", None):
        return 0
    from prefect.settings import (
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
        get_current_settings,
        temporary_settings,
    )

    from prefect_gptimage.settings import get_settings

    settings = get_current_settings()
    if settings.api.url or settings.results.default_storage_block or get_settings().lock_url:
        return 0
    if _may_have_global_limit(
        settings.server.database.connection_url, get_settings().concurrency_limit_name
    ):
        return 0
    # the local store only: asking for a server-side default store would start a server here
    with temporary_settings(updates={PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: False}):
        return _submit_first_rows(args, request)


def _submit_first_rows(args: argparse.Namespace, request: AnyRequest | None) -> int:
    from prefect_gptimage.flows._preflight import check_budget, preflight_bucket
    from prefect_gptimage.flows.batch import MAX_RESUMED_AHEAD, plan_cost
    from prefect_gptimage.prompts import PromptRow, load_prompt_file, unique_rows
    from prefect_gptimage.tasks.concurrency import local_cap, on_hand_over
    from prefect_gptimage.tasks.queue import sync_client

    max_cost = check_budget(getattr(args, "max_cost", None))
    preflight_bucket(args.bucket, args.prefix, presign_expires=86400, probe=True)
    if request is None:  # a batch: its rows, its cap
        rows = unique_rows(load_prompt_file(args.file))
        concurrency, lookahead = args.concurrency, args.lookahead
    else:  # generate: one request, under the default cap
        rows, concurrency, lookahead = [PromptRow(line=1, request=request)], None, None
    estimate, _ = plan_cost(rows, resubmit_unknown=args.resubmit_unknown)
    if max_cost is not None and estimate > max_cost:
        return 0  # the flow refuses the batch and says so
    cap, extra = local_cap(concurrency, lookahead)
    ahead = _Ahead(rows, sync_client(None), args.resubmit_unknown, concurrency, lookahead)
    ahead.budget = MAX_RESUMED_AHEAD  # the flow widens its window for these, up to this
    picks = ahead.reserve(cap + extra)
    if not picks:
        return 0
    sent: list[tuple[PromptRow, RequestHandle]] = []
    with ThreadPoolExecutor(max_workers=min(8, len(picks))) as pool:
        # each thread runs in a copy of this context: the temporary settings above reach it
        futures = [pool.submit(contextvars.copy_context().run, ahead.send, row) for row in picks]
        for row, future in zip(picks, futures, strict=True):
            try:
                sent.append((row, future.result()))
            except Exception as exc:  # recorded by the protocol; the row's task reports it
                logger.debug("head start submit failed: %s", exc)
    if request is None and sent:  # a batch: keep fal busy until the flow's tasks take over
        on_hand_over(ahead.stop)
        global _running
        _running = ahead
        for row, handle in sent:
            threading.Thread(
                target=contextvars.copy_context().run,
                args=(ahead.keep_busy, row, handle),
                name="prefect-gptimage-head-start",
                daemon=True,
            ).start()
    return len(sent)


def stop_head_start() -> None:
    """Stop submitting ahead (the command is over, or stopped): returns once the last submit
    is recorded. A no-op when nothing runs."""
    if _running is not None:
        _running.quit()


class _Ahead:
    """The head start's submits: the first rows at once, then one more each time one completes.

    Each request holds a reserved slot of the local cap (:func:`reserve_slot`). When one
    completes at fal, its slot goes to the next uncached row (:func:`completed_at_fal`: the
    finished request's task then fetches its result without a slot), so fal keeps running the
    cap's worth of requests while Prefect's temporary API boots. :meth:`stop`, run before the
    first task looks at its request (:func:`hand_over`), ends the submits: after the one in
    progress is recorded, nothing more is sent, and the flow's tasks resume what was. Until a
    task takes its request over, a completion still frees the slot, for the tasks' next rows.
    """

    def __init__(
        self,
        rows: list[PromptRow],
        client: FalQueueClient,
        resubmit_unknown: bool,
        concurrency: int | None,
        lookahead: int | None,
    ) -> None:
        from prefect_gptimage.tasks.cache import is_submit_cached
        from prefect_gptimage.tasks.intents import read_intent

        self._client = client
        self._resubmit_unknown = resubmit_unknown
        self._cap = (concurrency, lookahead)
        # rows not paid for yet, nor left to the flow (a resume, or "outcome unknown")
        self._rows = (
            row
            for row in rows
            if not is_submit_cached(row.request, row.variant)
            and read_intent(row.request, row.variant) is None
        )
        self.budget = 0  # how many rows it may still take (:meth:`reserve`)
        self._waiting: PromptRow | None = None  # the next row, when no slot was free for it
        self._lock = threading.Lock()  # held through each submit after the first ones
        self._stopped = threading.Event()  # nothing more is submitted
        self._quit = threading.Event()  # nothing more is watched

    def reserve(self, count: int) -> list[PromptRow]:
        """Up to ``count`` next rows, each with a reserved slot."""
        from prefect_gptimage.tasks.concurrency import reserve_slot

        picks: list[PromptRow] = []
        while len(picks) < min(count, self.budget):
            row = self._waiting or next(self._rows, None)
            self._waiting = None
            if row is None:
                break
            if not reserve_slot(_key(row), *self._cap):
                self._waiting = row  # the next free slot's
                break
            picks.append(row)
        self.budget -= len(picks)
        return picks

    def send(self, row: PromptRow) -> RequestHandle:
        """Submit ``row`` under the intent protocol."""
        from prefect_gptimage.tasks.intents import guarded_submit

        return guarded_submit(
            row.request,
            row.variant,
            lambda: self._client.submit(row.request),
            resubmit_unknown=self._resubmit_unknown,
            note=HEAD_START_NOTE,
        )

    def keep_busy(self, row: PromptRow, handle: RequestHandle) -> None:
        """Watch ``row``'s request; when it completes, submit the next row and watch that."""
        from prefect_gptimage.tasks.concurrency import completed_at_fal

        while self._completed(handle):
            with self._lock:
                # after the hand-over too: the freed slot goes to the next row's task at once
                if not completed_at_fal(_key(row)) or self._stopped.is_set():
                    return
                picks = self.reserve(1)
                if not picks:
                    return
                row = picks[0]
                try:
                    handle = self.send(row)
                except Exception as exc:  # recorded by the protocol; the row's task reports it
                    logger.debug("head start submit failed: %s", exc)
                    return

    def _completed(self, handle: RequestHandle) -> bool:
        """Poll as a task's wait does (it teaches the latency model); False once the command
        ends (:meth:`quit`). The hand-over does not end it: until the row's task takes the
        request over, its completion frees its slot for the tasks."""
        from prefect_gptimage.fal._wait import WaitTracker

        track = WaitTracker(handle, None, logger)
        delay = track.delay() if track.learning else 0.0
        try:
            while not self._quit.wait(delay):
                current = self._client.status(handle)
                track.update(current)
                if current.done:
                    return not current.error
                if track.timed_out():
                    return False
                delay = track.delay()
        except Exception as exc:  # the row's task meets it again, and reports it
            logger.debug("head start: status of %s failed: %s", handle.request_id, exc)
        return False

    def stop(self) -> None:
        """Send nothing more; returns once a submit in progress is recorded."""
        self._stopped.set()
        with self._lock:
            pass

    def quit(self) -> None:
        """Stop, and watch nothing more (the command is over)."""
        self._quit.set()
        self.stop()


_running: _Ahead | None = None


def _key(row: PromptRow) -> str:
    from prefect_gptimage.schemas import request_fingerprint

    return request_fingerprint(row.request, row.variant)


def _may_have_global_limit(connection_url: object, name: str) -> bool:
    """Whether the temporary API's database may hold an active global concurrency limit."""
    url = str(getattr(connection_url, "get_secret_value", lambda: connection_url)())
    prefix = next((p for p in _SQLITE_PREFIXES if url.startswith(p)), None)
    if prefix is None:
        return True  # not SQLite: not read here
    path = Path(unquote(url[len(prefix) :].split("?", 1)[0]))
    if not path.exists():
        return False  # a fresh home: no limit was ever created in it
    try:
        uri = f"file:{os.fspath(path)}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True, timeout=0.5)) as db:
            row = db.execute(
                "SELECT active FROM concurrency_limit_v2 WHERE name = ?", (name,)
            ).fetchone()
    except sqlite3.OperationalError as exc:
        # a database the temporary server is creating right now has no such table yet, and so
        # no limit; locked, or another schema: assume it may
        return "no such table" not in str(exc)
    except sqlite3.Error:
        return True
    return row is not None and bool(row[0])
