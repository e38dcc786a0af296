"""The adaptive polling schedule over a long batch: few status calls, and no creeping lateness."""

from __future__ import annotations

import random

import pytest

from prefect_gptimage.fal.polling import LatencyModel, next_poll_delay, observed_duration


def simulate(latency: float, n: int, spread: float = 0.0) -> tuple[float, float, float]:
    """Wait for ``n`` requests as the client does: (calls/request, mean lateness, last 50)."""
    model, calls, late = LatencyModel(), [], []
    rng = random.Random(7)
    for _ in range(n):
        actual = latency * (1 + rng.uniform(-spread, spread))
        expected, t, polls, last_pending = model.expected("k"), 0.0, 0, None
        t += next_poll_delay(expected, elapsed=t, polls=polls)  # first sleep before any call
        while True:
            polls += 1
            if t >= actual:
                break
            last_pending = t
            t += next_poll_delay(model.expected("k"), elapsed=t, polls=polls)
        model.observe("k", observed_duration(last_pending, t))
        calls.append(polls)
        late.append(t - actual)
    return sum(calls) / n, sum(late) / n, sum(late[-50:]) / 50


@pytest.mark.parametrize("latency", [1.0, 3.0, 15.0, 60.0])
def test_exact_latency_few_calls_and_no_drift(latency: float) -> None:
    calls, late, late_end = simulate(latency, 1000)
    assert calls <= 2.0
    assert late < 0.05 * latency  # under 5% later than the request really finished
    assert late_end < 0.05 * latency  # and it does not creep up over a long batch


def test_noisy_latency_stays_within_budget() -> None:
    calls, late, _ = simulate(3.0, 1000, spread=0.2)
    assert calls <= 3.0
    assert late < 0.15 * 3.0
