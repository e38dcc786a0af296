"""A deployment run of a batch suspends while fal works: no worker held (issue 20).

Opt-in, and only where it can work: ``PREFECT_GPTIMAGE_WEBHOOK_URL`` and
``PREFECT_GPTIMAGE_WEBHOOK_SUSPEND`` set, the flow run belongs to a deployment (Prefect
reschedules only those) and is no subflow, and the batch neither refreshes its cache (a refresh
pays anew on every execution) nor runs on a cluster. Otherwise :func:`suspend_in_waves` does
nothing and the batch runs exactly as without it.

**Waves** (:func:`suspend_in_waves`, called by the flow after its checks, before the row
engine). The rows not done yet are submitted in waves of the cap (``concurrency`` plus the
look-ahead), each through the rows' own recorded submit
(:func:`~prefect_gptimage.tasks.queue.submit_recorded`: intents, cache record, fleet budget and
lock exactly as a row's), so there is no second path that could pay twice. After each wave the
run writes that wave's waiter (:mod:`prefect_gptimage.tasks.waiters`: its flow-run id, the
wave's number and request ids, a pointer per id) and reads the callback records: if some are
missing it calls Prefect's public ``suspend_flow_run`` with the wave's own pause key
(:func:`~prefect_gptimage.tasks.waiters.suspend_key`), and its process ends. A wave is the cap
because fal runs at most that many of the run's requests at once: the next wave is submitted
once the last one is done at fal, so a worker is held only to submit a wave, and, at the end,
to stage.

**Resumed**, by the receiver (:mod:`prefect_gptimage.webhooks.resume`) once the wave it waits
on has its callbacks recorded, or the sweep delay passed, the flow runs again from the top: the
earlier waves' submits come from their records (nothing is paid again, nothing is sent), their
waiters are the recorded ones, and their suspends are refused by Prefect ("already fired"), so
the run reaches the next wave, submits it and suspends again. After the last wave the batch goes
on in the row engine: every row reads its recorded submit and callback and stages (a row whose
callback never came sweeps: polls fal); a row the waves left out (its submit failed, its inputs
resolve inline, an unknown earlier outcome) runs as without suspending.

Each suspend's ``timeout`` is the sweep delay plus :data:`RESUME_GRACE` seconds: the receiver
resumes a waiter at the sweep delay at the latest, the grace covers a receiver that was down.
A run not resumed by then can no longer be resumed (Prefect fails it on resume); running the
batch again costs nothing already paid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import count
from typing import Any, NamedTuple
from uuid import UUID

from prefect.flow_runs import suspend_flow_run
from prefect.logging import get_run_logger

from prefect_gptimage._run_context import current_flow_run
from prefect_gptimage.engine.options import RunOptions
from prefect_gptimage.errors import GptImageError
from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.prompts import PromptRow
from prefect_gptimage.schemas import AnyRequest
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.cache import cached_generation
from prefect_gptimage.tasks.concurrency import local_cap
from prefect_gptimage.tasks.intents import FateStores, fate_stores, submit_fate
from prefect_gptimage.tasks.options import GenerationOptions
from prefect_gptimage.tasks.queue import submit_recorded
from prefect_gptimage.tasks.waiters import Waiter, read_waiter, suspend_key, write_waiter

__all__ = [
    "RESUME_GRACE",
    "Waves",
    "suspend_in_waves",
    "suspending_run",
    "wave_size",
]

#: Seconds a suspended run may wait beyond the sweep delay for the receiver to resume it.
RESUME_GRACE = 3600


class Waves(NamedTuple):
    """What the waves leave to the rest of the run: ``paid``, the request ids this flow run
    paid for (its rows count them as paid, :attr:`GenerationOptions.paid_in_run`, not as
    cached), and ``earlier_cost``, the estimate of those paid by an earlier execution of the run
    (before it suspended): the plan of a resumed run counts them as cached, so the run adds it
    back to its estimate."""

    paid: frozenset[str] = frozenset()
    earlier_cost: float = 0.0


class _Wave(NamedTuple):
    ids: list[str]  # the wave's request ids, in row order
    paid: list[str]  # those this execution paid for
    paid_cost: float  # their estimated cost
    next_row: int  # the index of the row after the wave's last
    last: bool  # no wave after it: a submit failed, or the run is stopping


def suspending_run(options: RunOptions) -> UUID | None:
    """The id of the current flow run if it may suspend while fal works (see the module
    docs), else None."""
    settings = get_settings()
    if not (settings.webhook_url and settings.webhook_suspend):
        return None
    if options.refresh or options.cluster:
        return None
    run = current_flow_run()
    if run is None or run.deployment_id is None or run.parent_task_run_id is not None:
        return None
    return run.id


def wave_size(options: RunOptions) -> int:
    """Requests of a wave: the local cap on fal requests plus the look-ahead."""
    cap, ahead = local_cap(options.concurrency, options.lookahead)
    return cap + ahead


def _submit_wave(
    rows: Sequence[PromptRow],
    start: int,
    request_of: Callable[[PromptRow], AnyRequest],
    generation: GenerationOptions,
    size: int,
    stores: FateStores,
    log: Any,
) -> _Wave:
    """Submit (or find recorded) the requests of the next ``size`` rows from ``rows[start]`` on
    that are not done yet. A row that cannot be submitted now ends the waves: the engine runs
    it as usual.
    """
    ids: list[str] = []
    paid: list[str] = []
    cost = 0.0

    def wave(next_row: int, last: bool = False) -> _Wave:
        return _Wave(ids, paid, cost, next_row, last)

    for index in range(start, len(rows)):
        row = rows[index]
        if generation.stop is not None and generation.stop.requested:
            return wave(index, last=True)
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
            log.warning("waves end before row %s: %s", row.line, str(exc).splitlines()[0])
            return wave(index, last=True)
        ids.append(handle.request_id)
        if not recorded:  # recorded: paid by an earlier run (or before a crash): not this run
            paid.append(handle.request_id)
            cost += estimate_cost(request)
        if len(ids) >= size:
            return wave(index + 1)
    return wave(len(rows))


def _wait_for(waiter: Waiter, log: Any) -> None:
    """Suspend the flow run until ``waiter``'s callbacks are recorded (its process ends), unless
    they are, or this wave's suspend fired already (a resumed run): then return."""
    missing = waiter.missing()
    sweep_after = get_settings().webhook_sweep_after
    if waiter.ready(sweep_after, missing):  # the receiver's rule for resuming, too
        log.info(
            "wave %d: %d of %d callback(s) recorded; going on",
            waiter.wave,
            len(waiter.request_ids) - len(missing),
            len(waiter.request_ids),
        )
        return
    log.info(
        "wave %d of %d request(s) at fal: suspending until the webhook receiver has their "
        "callbacks (%d missing; at most %.0f s, then they sweep)",
        waiter.wave,
        len(waiter.request_ids),
        len(missing),
        sweep_after,
    )
    # ends this process (Prefect's Pause); returns only when this suspend already fired
    suspend_flow_run(timeout=int(sweep_after) + RESUME_GRACE, key=suspend_key(waiter.wave))


def suspend_in_waves(
    rows: Sequence[PromptRow],
    options: RunOptions,
    generation: GenerationOptions,
    request_of: Callable[[PromptRow], AnyRequest],
) -> Waves:
    """Submit ``rows`` in waves, suspending the flow run while fal works on each (see the
    module docs; each suspend ends the process); returns when the run goes on to stage:
    suspending is off or not possible here, or every wave is done. ``request_of(row)``: the
    request a row submits (its inputs' links signed anew).

    A resumed run reads the earlier waves' waiters only (one record per wave): their rows'
    records are not read again until the engine stages them."""
    flow_run_id = suspending_run(options)
    if flow_run_id is None:
        return Waves()
    log = get_run_logger()
    size = wave_size(options)
    stores = fate_stores()  # resolved once for the run's waves, as the plan does
    paid: set[str] = set()
    earlier = 0.0  # paid by an earlier execution of this run
    start = 0
    recorded = read_waiter(flow_run_id, 0)
    for number in count():
        if recorded is None:  # a new wave: submit it
            wave = _submit_wave(rows, start, request_of, generation, size, stores, log)
            if not wave.ids:
                return Waves(frozenset(paid), earlier)
            fresh = Waiter(
                flow_run_id=str(flow_run_id),
                wave=number,
                request_ids=tuple(wave.ids),
                paid=tuple(wave.paid),
                paid_cost=wave.paid_cost,
                next_row=wave.next_row,
            )
            waiter, found = write_waiter(fresh)
            last, following = wave.last, None
        else:  # written by an earlier execution: the run was past it if the next one is too
            waiter, found, last = recorded, True, False
            following = read_waiter(flow_run_id, number + 1)
        paid.update(waiter.paid)
        earlier += waiter.paid_cost if found else 0.0
        if following is None:  # the wave the run is at
            _wait_for(waiter, log)
        if last:
            return Waves(frozenset(paid), earlier)
        start, recorded = waiter.next_row, following
    raise AssertionError("unreachable: count() never ends")  # pragma: no cover
