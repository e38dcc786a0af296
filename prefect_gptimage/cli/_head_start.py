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
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from prefect_gptimage.cli._signals import StopBeforeStart

if TYPE_CHECKING:
    from prefect_gptimage.schemas import AnyRequest

__all__ = ["HEAD_START_NOTE", "head_start"]

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
    from prefect_gptimage.flows.batch import plan_cost
    from prefect_gptimage.prompts import PromptRow, load_prompt_file, unique_rows
    from prefect_gptimage.schemas import request_fingerprint
    from prefect_gptimage.tasks.cache import is_submit_cached
    from prefect_gptimage.tasks.concurrency import local_cap, reserve_slot
    from prefect_gptimage.tasks.intents import guarded_submit, read_intent
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
    picks: list[PromptRow] = []
    for row in rows:
        if len(picks) >= cap + extra:
            break
        if is_submit_cached(row.request, row.variant) or read_intent(row.request, row.variant):
            continue  # paid already, or the flow decides (resume, or "outcome unknown")
        if reserve_slot(request_fingerprint(row.request, row.variant), concurrency, lookahead):
            picks.append(row)
    if not picks:
        return 0
    client = sync_client(None)

    def send(row: PromptRow) -> bool:
        guarded_submit(
            row.request,
            row.variant,
            lambda: client.submit(row.request),
            resubmit_unknown=args.resubmit_unknown,
            note=HEAD_START_NOTE,
        )
        return True

    sent = 0
    with ThreadPoolExecutor(max_workers=min(8, len(picks))) as pool:
        # each thread runs in a copy of this context: the temporary settings above reach it
        futures = [pool.submit(contextvars.copy_context().run, send, row) for row in picks]
        for future in futures:
            try:
                sent += future.result()
            except Exception as exc:  # recorded by the protocol; the row's task reports it
                logger.debug("head start submit failed: %s", exc)
    return sent


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
    except sqlite3.Error:
        return True  # locked, or another schema: assume it may
    return row is not None and bool(row[0])
