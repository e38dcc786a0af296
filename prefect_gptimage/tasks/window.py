"""Run many items through a task runner with a bounded window, results back in input order.

A batch of 10,000 rows must neither submit 10,000 futures at once (one giant flow state) nor
wait for a whole chunk before starting the next (the slowest row of each chunk would leave
fal's slots idle). :func:`in_order` keeps at most ``window`` items in flight, starts the next
item the moment any finishes, and yields ``(item, result)`` strictly in input order, so what
the caller writes (a manifest) is the same on every run. Results that finish ahead of a slower
earlier item wait in a buffer of at most ``max_buffered``; when it is full no new item starts
until the earlier one is done, which keeps memory bounded even when one item is stuck.

Example:
    >>> for row, result in in_order(rows, lambda row: runner.submit(task, parameters={...})):
    ...     report.add(result)  # doctest: +SKIP
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from prefect.futures import PrefectFuture

T = TypeVar("T")

#: Items in flight at once, by default.
WINDOW = 256
#: Finished results held back for an earlier, slower item, at most.
MAX_BUFFERED = 4096


def _notify(finished: queue.SimpleQueue[int], index: int) -> Callable[[Any], None]:
    return lambda _future: finished.put(index)


def in_order(
    items: Sequence[T],
    submit: Callable[[T], PrefectFuture[Any]],
    *,
    window: int = WINDOW,
    max_buffered: int = MAX_BUFFERED,
    on_finished: Callable[[], None] | None = None,
) -> Iterator[tuple[T, Any]]:
    """Submit ``items`` (at most ``window`` in flight); yield ``(item, result)`` in input order.

    ``result`` is the task's return value, or the exception it failed with (never raised here:
    one failed item does not stop the others). ``on_finished`` is called as each item finishes,
    in completion order (for progress).
    """
    if window < 1 or max_buffered < 1:
        raise ValueError(f"window and max_buffered must be >= 1 (got {window}, {max_buffered})")
    finished: queue.SimpleQueue[int] = queue.SimpleQueue()
    running: dict[int, PrefectFuture[Any]] = {}
    ready: dict[int, Any] = {}
    next_start = next_yield = 0
    while next_yield < len(items):
        while (
            next_start < len(items)
            and len(running) < window
            and len(ready) + len(running) < max_buffered
        ):
            future = submit(items[next_start])
            running[next_start] = future
            future.add_done_callback(_notify(finished, next_start))
            next_start += 1
        index = finished.get()
        future = running.pop(index)
        future.wait()
        ready[index] = future.state.result(raise_on_failure=False)
        if on_finished is not None:
            on_finished()
        while next_yield in ready:
            yield items[next_yield], ready.pop(next_yield)
            next_yield += 1
