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


class Tracker:
    """What the tasks saw: how many ran at once, in what order they started and finished."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.peak = 0
        self.started: dict[int, float] = {}
        self.finished: dict[int, float] = {}


TRACK = Tracker()


@task(cache_policy=NO_CACHE, task_run_name="item {i}")
def item(i: int, delay: float, fail: bool = False) -> int:
    with TRACK.lock:
        TRACK.running += 1
        TRACK.peak = max(TRACK.peak, TRACK.running)
        TRACK.started[i] = time.monotonic()
    time.sleep(delay)
    with TRACK.lock:
        TRACK.running -= 1
        TRACK.finished[i] = time.monotonic()
    if fail:
        raise ValueError(f"item {i} failed")
    return i * 10


@flow
def run_items(delays: list[float], window: int, max_buffered: int, fail: int) -> list[Any]:
    with ThreadPoolTaskRunner(max_workers=32) as runner:
        return list(
            in_order(
                list(range(len(delays))),
                lambda i: runner.submit(
                    item,  # type: ignore[arg-type]
                    parameters={"i": i, "delay": delays[i], "fail": i == fail},
                ),
                window=window,
                max_buffered=max_buffered,
            )
        )


@pytest.fixture
def track() -> Tracker:
    global TRACK
    TRACK = Tracker()
    return TRACK


def test_results_come_back_in_order_with_at_most_window_in_flight(track: Tracker) -> None:
    # the first item is slow, so many later ones finish before it; item 3 fails
    delays = [1.0] + [0.05] * 23

    out = run_items(delays, window=6, max_buffered=100, fail=3)

    assert [i for i, _ in out] == list(range(24))
    assert [r for i, r in out if i != 3] == [i * 10 for i in range(24) if i != 3]
    assert isinstance(out[3][1], ValueError)  # one failure does not stop the others
    assert 1 < track.peak <= 6  # rows overlap, and never more than the window
    assert min(track.finished, key=track.finished.__getitem__) != 0  # out of order


def test_a_stuck_item_holds_back_at_most_max_buffered(track: Tracker) -> None:
    delays = [1.5] + [0.01] * 40

    out = run_items(delays, window=8, max_buffered=10, fail=-1)

    assert [i for i, _ in out] == list(range(41))
    # while item 0 was stuck, items 1-9 ran (10 = max_buffered in all), the 11th had to wait
    stuck_until = track.finished[0]
    assert all(track.started[i] < stuck_until for i in range(1, 10))
    assert track.started[10] >= stuck_until


def test_a_window_of_zero_is_refused_before_anything_runs(track: Tracker) -> None:
    with pytest.raises(ValueError, match="window"):
        list(in_order([1, 2], lambda i: pytest.fail("submitted"), window=0))


def test_a_run_that_fails_half_way_leaves_no_partial_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(RuntimeError), RunReport(out, "half-way", None):
        raise RuntimeError("the flow crashed")
    assert list(out.iterdir()) == []
