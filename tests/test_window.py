"""Rows through the task runner: a bounded window, results back in file order, bounded memory."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from prefect_gptimage.reporting.run_report import RunReport
from prefect_gptimage.tasks.window import in_order

#: Seconds a held item waits for what it is held for: generous, a loaded machine is slow; a
#: window that never lets it through fails the test instead of hanging it.
HOLD_S = 120.0


class Tracker:
    """What the tasks saw: how many ran at once, in what order they started and finished, and
    the order of the window's own steps (``events``: submitted, processed, yielded); and what
    holds items back: item ``i`` starts its work once ``processed`` reached ``after[i]``, and
    waits for the others of its ``barrier``."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.running = self.peak = self.processed = 0
        self.started: dict[int, float] = {}
        self.finished: dict[int, float] = {}
        self.events: list[tuple[str, int]] = []
        self.after: dict[int, int] = {}
        self.barrier: dict[int, threading.Barrier] = {}

    def on_finished(self) -> None:
        """``in_order``'s callback: one more item's result was taken in."""
        with self.cond:
            self.processed += 1
            self.events.append(("processed", self.processed))
            self.cond.notify_all()

    def index(self, event: tuple[str, int]) -> int:
        return self.events.index(event)


TRACK = Tracker()


@task(cache_policy=NO_CACHE, task_run_name="item {i}")
def item(i: int, fail: bool = False) -> int:
    with TRACK.cond:
        TRACK.running += 1
        TRACK.peak = max(TRACK.peak, TRACK.running)
        TRACK.started[i] = time.monotonic()
        held = TRACK.cond.wait_for(lambda: TRACK.processed >= TRACK.after.get(i, 0), HOLD_S)
    if i in TRACK.barrier:
        TRACK.barrier[i].wait(HOLD_S)  # all of them at once, or BrokenBarrierError
    with TRACK.cond:
        TRACK.running -= 1
        TRACK.finished[i] = time.monotonic()
    if not held:
        raise TimeoutError(f"item {i} was held for {HOLD_S} s: the others never got through")
    if fail:
        raise ValueError(f"item {i} failed")
    return i * 10


@flow
def run_items(n: int, window: int, max_buffered: int, fail: int) -> list[Any]:
    def submit(i: int) -> Any:
        with TRACK.cond:
            TRACK.events.append(("submitted", i))
        return runner.submit(item, parameters={"i": i, "fail": i == fail})  # type: ignore[arg-type]

    out = []
    with ThreadPoolTaskRunner(max_workers=32) as runner:
        for i, result in in_order(
            list(range(n)),
            submit,
            window=window,
            max_buffered=max_buffered,
            on_finished=TRACK.on_finished,
        ):
            with TRACK.cond:
                TRACK.events.append(("yielded", i))
            out.append((i, result))
    return out


@pytest.fixture
def track() -> Tracker:
    global TRACK
    TRACK = Tracker()
    return TRACK


def test_results_come_back_in_order_with_at_most_window_in_flight(track: Tracker) -> None:
    # items 1-5 meet at a barrier (six in flight at once, with item 0); item 0 waits until they
    # were taken in, so later ones finish before it; item 3 fails
    track.after[0] = 5
    barrier = threading.Barrier(5)
    track.barrier.update({i: barrier for i in range(1, 6)})

    out = run_items(24, window=6, max_buffered=100, fail=3)

    assert [i for i, _ in out] == list(range(24))
    assert [r for i, r in out if i != 3] == [i * 10 for i in range(24) if i != 3]
    assert isinstance(out[3][1], ValueError)  # one failure does not stop the others
    assert track.peak == 6  # rows overlap up to the window, and never more
    assert min(track.finished, key=track.finished.__getitem__) != 0  # out of order


def test_a_stuck_item_holds_back_at_most_max_buffered(track: Tracker) -> None:
    # item 0 is stuck until the window took in nine results after it: 10 = max_buffered in all
    track.after[0] = 9

    out = run_items(41, window=8, max_buffered=10, fail=-1)

    assert out == [(i, i * 10) for i in range(41)]
    # while item 0 was stuck, items 1-9 ran, the 11th had to wait until item 0 was yielded
    # (the window's own steps, in its one thread: an order, not a timing)
    stuck_until = track.finished[0]
    assert all(track.started[i] < stuck_until for i in range(1, 10))
    assert track.index(("yielded", 0)) < track.index(("submitted", 10))
    assert track.started[10] >= stuck_until


def test_a_window_of_zero_is_refused_before_anything_runs(track: Tracker) -> None:
    with pytest.raises(ValueError, match="window"):
        list(in_order([1, 2], lambda i: pytest.fail("submitted"), window=0))


def test_a_run_that_fails_half_way_leaves_no_partial_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(RuntimeError), RunReport(out, "half-way", None):
        raise RuntimeError("the flow crashed")
    assert list(out.iterdir()) == []
