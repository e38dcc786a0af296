"""A deployment run of a batch suspends while fal works: no worker held (issue 20).

Opt-in, and only where it can work: ``PREFECT_GPTIMAGE_WEBHOOK_URL`` and
``PREFECT_GPTIMAGE_WEBHOOK_SUSPEND`` set, the flow run belongs to a deployment (Prefect
reschedules only those) and is no subflow, and the batch neither refreshes its cache (a refresh
pays anew on every execution) nor runs on a cluster. Otherwise :func:`suspend_for_first_wave`
does nothing and the batch runs exactly as without it.

**Phase 1** (:func:`suspend_for_first_wave`, called by the flow after its checks, before the row
engine): the first wave, the rows that fit the cap (``concurrency`` plus the look-ahead) and are
not done yet, is submitted through the rows' own recorded submit
(:func:`~prefect_gptimage.tasks.queue.submit_recorded`: intents, cache record, fleet budget and
lock exactly as a row's), so there is no second path that could pay twice. The run then writes
its waiter (:mod:`prefect_gptimage.tasks.waiters`: its flow-run id, the wave's request ids, a
pointer per id) and reads the callback records: if some are missing it calls Prefect's public
``suspend_flow_run`` with the stable key :data:`SUSPEND_KEY`, and its process ends.

**Resumed**, by the receiver (:mod:`prefect_gptimage.webhooks.resume`) once the wave's
callbacks are recorded, or the sweep delay passed, the flow runs again from the top: the wave's
submits come from their records (nothing is paid again), the waiter is the recorded one, and the
suspend with the same key is refused by Prefect ("already fired"), so it returns and the batch
goes on in the row engine: the wave's rows read their callbacks and stage at once, the rows
beyond the wave run as without suspending (waiting on callbacks with the worker held).

The suspend's ``timeout`` is the sweep delay plus :data:`RESUME_GRACE` seconds: the receiver
resumes a waiter at the sweep delay at the latest, the grace covers a receiver that was down.
A run not resumed by then can no longer be resumed (Prefect fails it on resume); running the
batch again costs nothing already paid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from uuid import UUID

from prefect.context import FlowRunContext
from prefect.flow_runs import suspend_flow_run
from prefect.logging import get_run_logger

from prefect_gptimage.engine.options import RunOptions
from prefect_gptimage.errors import GptImageError
from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.prompts import PromptRow
from prefect_gptimage.schemas import AnyRequest
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.cache import cached_generation
from prefect_gptimage.tasks.concurrency import local_cap
from prefect_gptimage.tasks.generate import GenerationOptions
from prefect_gptimage.tasks.intents import fate_stores, submit_fate
from prefect_gptimage.tasks.queue import submit_recorded
from prefect_gptimage.tasks.waiters import write_waiter

__all__ = [
    "RESUME_GRACE",
    "SUSPEND_KEY",
    "FirstWave",
    "suspend_for_first_wave",
    "suspending_run",
    "wave_size",
]

#: The pause key of the suspend: one suspend per flow run, so a resumed run goes on.
SUSPEND_KEY = "gptimage-first-wave"
#: Seconds a suspended run may wait beyond the sweep delay for the receiver to resume it.
RESUME_GRACE = 3600


class FirstWave(NamedTuple):
    """What the first wave leaves to the rest of the run: ``paid``, the request ids this flow
    run paid for (its rows count them as paid, :attr:`GenerationOptions.paid_in_run`, not as
    cached), and ``earlier_cost``, the estimate of those paid by an earlier execution of the run
    (before it suspended): the plan of a resumed run counts them as cached, so the run adds it
    back to its estimate."""

    paid: frozenset[str] = frozenset()
    earlier_cost: float = 0.0


class _Wave(NamedTuple):
    ids: list[str]  # the wave's request ids, in row order
    paid: list[str]  # those this execution paid for
    found: dict[str, float]  # those found recorded: their estimated cost


def suspending_run(options: RunOptions) -> UUID | None:
    """The id of the current flow run if it may suspend for its first wave (see the module
    docs), else None."""
    settings = get_settings()
    if not (settings.webhook_url and settings.webhook_suspend):
        return None
    if options.refresh or options.cluster:
        return None
    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    if run is None or run.deployment_id is None or run.parent_task_run_id is not None:
        return None
    return run.id


def wave_size(options: RunOptions) -> int:
    """Requests of the first wave: the local cap on fal requests plus the look-ahead."""
    cap, ahead = local_cap(options.concurrency, options.lookahead)
    return cap + ahead


def _submit_wave(
    rows: Sequence[PromptRow],
    request_of: Callable[[PromptRow], AnyRequest],
    generation: GenerationOptions,
    size: int,
    log: Any,
) -> _Wave:
    """Submit (or find recorded) the requests of the first ``size`` rows not done yet. A row
    that cannot be submitted now ends the wave: the engine runs it as usual.
    """
    wave = _Wave([], [], {})
    stores = fate_stores()  # resolved once for the wave, as the plan does
    for row in rows:
        if len(wave.ids) >= size or (generation.stop is not None and generation.stop.requested):
            break
        request = request_of(row)
        if getattr(request, "unresolved_inputs", None):
            continue  # resolved inline by the row itself: left to the engine
        if cached_generation(request, row.variant) is not None:
            continue  # done already: nothing to wait for
        fate = submit_fate(
            request, row.variant, resubmit_unknown=generation.resubmit_unknown, stores=stores
        )
        if fate == "unknown":
            continue  # possibly billed: the engine fails it unpaid, saying so
        try:
            handle, recorded = submit_recorded(
                request,
                generation.credentials,
                row.variant,
                resubmit_unknown=generation.resubmit_unknown,
                retention=generation.retention(),
                budget_wait=generation.budget_wait,
            )
        except GptImageError as exc:
            log.warning("first wave ends before row %s: %s", row.line, str(exc).splitlines()[0])
            break
        wave.ids.append(handle.request_id)
        if recorded:
            wave.found[handle.request_id] = estimate_cost(request)
        else:
            wave.paid.append(handle.request_id)
    return wave


def suspend_for_first_wave(
    rows: Sequence[PromptRow],
    options: RunOptions,
    generation: GenerationOptions,
    request_of: Callable[[PromptRow], AnyRequest],
) -> FirstWave:
    """Phase 1 (see the module docs): submit the first wave, write the waiter and suspend the
    flow run while callbacks are missing (the process ends); returns when the run goes on
    (suspending is off or not possible here, every callback is in, or this is the resumed run):
    see :class:`FirstWave`. ``request_of(row)``: the request a row submits (its inputs' links
    signed anew)."""
    flow_run_id = suspending_run(options)
    if flow_run_id is None:
        return FirstWave()
    log = get_run_logger()
    wave = _submit_wave(rows, request_of, generation, wave_size(options), log)
    if not wave.ids:
        return FirstWave()
    waiter = write_waiter(flow_run_id, wave.ids, wave.paid)
    earlier = sum(wave.found.get(rid, 0.0) for rid in waiter.paid)
    done = FirstWave(frozenset(waiter.paid), earlier)
    missing = waiter.missing()
    sweep_after = get_settings().webhook_sweep_after
    if waiter.ready(sweep_after, missing):  # the receiver's rule for resuming, too
        log.info(
            "first wave: %d of %d callback(s) recorded; going on",
            len(waiter.request_ids) - len(missing),
            len(waiter.request_ids),
        )
        return done
    log.info(
        "first wave of %d request(s) at fal: suspending until the webhook receiver has their "
        "callbacks (%d missing; at most %.0f s, then they sweep)",
        len(waiter.request_ids),
        len(missing),
        sweep_after,
    )
    # ends this process (Prefect's Pause); returns only when this suspend already fired
    suspend_flow_run(timeout=int(sweep_after) + RESUME_GRACE, key=SUSPEND_KEY)
    log.info("resumed before every callback came: the missing ones sweep (poll fal)")
    return done
