"""The fleet budget (a Prefect global concurrency limit) and prices read from fal (issue 21).

On the suite's real Prefect API and the bundled emulator's platform API: slots taken before a
billable submit and never given back, rows the budget cannot cover held back unpaid and
submitted by a later run, a wait for refill, fal's price change picked up and warned about, and
the built-in table when fal is unreachable. Two CLI processes on one ``prefect server`` sharing
one budget: tests/test_budget_fleet.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)

from prefect_gptimage.errors import BatchIncomplete, BudgetExhausted
from prefect_gptimage.flows.batch import batch_to_s3
from prefect_gptimage.pricing import estimate_cost, price_source, use_fal_prices
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.schemas import TEXT_TO_IMAGE_ENDPOINT, GptImageRequest
from prefect_gptimage.tasks.fleet_budget import read_budget, slots_for, take_budget
from prefect_gptimage.tasks.prices import load_prices
from prefect_gptimage.testing import FalEmulator


@pytest.fixture
def budget_name(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A budget limit name of this test's own (the setting renames the limit)."""
    name = f"budget-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PREFECT_GPTIMAGE_BUDGET_LIMIT_NAME", name)
    yield name
    with get_client(sync_client=True) as client, contextlib.suppress(Exception):
        client.delete_global_concurrency_limit_by_name(name)


@pytest.fixture(autouse=True)
def _builtin_prices(fal_emulator: FalEmulator) -> Iterator[None]:
    """Each test starts and ends on the built-in prices, at fal (the emulator) and here."""
    fal_emulator.platform.reset()
    use_fal_prices({})
    yield
    fal_emulator.platform.reset()
    use_fal_prices({})


def create_limit(name: str, limit: int, decay: float = 0.0) -> None:
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=limit, slot_decay_per_second=decay)
        )


def set_limit(name: str, limit: int) -> None:
    """As ``prefect gcl update NAME --limit N`` does: the public client's update."""
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit))


def write_rows(path: Path, prompts: list[str]) -> Path:
    rows = [{"prompt": p, "quality": "low", "output_format": "jpeg"} for p in prompts]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(**kw: object) -> tuple[RunSummary, str, str | None]:
    state = batch_to_s3(return_state=True, **kw)  # type: ignore[arg-type]
    result = state.result(raise_on_failure=False)
    summary = result.summary if isinstance(result, BatchIncomplete) else result
    assert isinstance(summary, RunSummary), summary
    return summary, state.type.value, state.message


def test_slots_round_up_to_cover_the_price() -> None:
    assert slots_for(0.009) == 9
    assert slots_for(0.0091) == 10
    assert slots_for(0.266) == 266
    assert slots_for(0.0) == 0


def test_no_budget_limit_means_no_fleet_budget(budget_name: str) -> None:
    assert read_budget() is None
    assert take_budget(5.0) == 0


def test_slots_are_taken_never_given_back_and_a_refusal_says_what_is_left(
    budget_name: str,
) -> None:
    create_limit(budget_name, 20)
    assert take_budget(0.009) == 9
    assert take_budget(0.009) == 9
    with pytest.raises(BudgetExhausted) as refused:
        take_budget(0.009)
    message = str(refused.value)
    assert budget_name in message
    assert "$0.002 left of $0.020" in message
    assert "does not refill" in message and "prefect gcl update" in message
    state = read_budget()
    assert state is not None and state.active_slots == 18  # nothing handed back, nothing taken


def test_a_submit_may_wait_for_the_budget_to_refill(budget_name: str) -> None:
    create_limit(budget_name, 10, decay=0.5)  # 9 slots come back in about 18 s
    assert take_budget(0.009) == 9
    with pytest.raises(BudgetExhausted, match="refills"):
        take_budget(0.009)
    assert take_budget(0.009, wait=180) == 9  # decay made room within the wait


def test_the_budget_holds_rows_back_unpaid_and_a_later_run_submits_only_those(
    fal_emulator: FalEmulator, budget_name: str, unique: str, tmp_path: Path
) -> None:
    create_limit(budget_name, 30)  # $0.030: three rows of $0.009
    prompts = [f"a budget kite {i} {unique}" for i in range(5)]
    path = write_rows(tmp_path / "p.jsonl", prompts)
    before = fal_emulator.stats["accepted"]
    summary, state, message = run(prompt_file=str(path), output_dir=str(tmp_path / "o"))
    assert state == "FAILED"
    held = [f for f in summary.failures if f.error_type == "BudgetExhausted"]
    assert len(held) == 2 and len(summary.failures) == 2
    assert all(budget_name in f.reason and "$0.003 left" in f.reason for f in held)
    assert message is not None and "the fleet budget held back 2 row(s)" in message
    assert fal_emulator.stats["accepted"] == before + 3
    assert summary.submitted == 3

    set_limit(budget_name, 100)
    again, state, _ = run(prompt_file=str(path), output_dir=str(tmp_path / "o"))
    assert state == "COMPLETED", again.failures
    assert again.submitted == 2  # only the rows held back were paid
    assert fal_emulator.stats["accepted"] == before + 5
    accepted = [p for r in fal_emulator.requests() if unique in (p := r.arguments["prompt"])]
    assert sorted(accepted) == sorted(prompts)  # each once: nothing paid twice
    budget = read_budget()
    assert budget is not None and budget.active_slots == 45  # 5 rows x 9 slots, kept


def test_max_cost_and_the_fleet_budget_both_apply(
    fal_emulator: FalEmulator, budget_name: str, unique: str, tmp_path: Path
) -> None:
    create_limit(budget_name, 1000)
    path = write_rows(tmp_path / "p.jsonl", [f"a max-cost kite {i} {unique}" for i in range(3)])
    _summary, state, message = run(
        prompt_file=str(path), output_dir=str(tmp_path / "o"), max_cost=0.02
    )
    assert state == "FAILED" and message is not None and "exceeds max_cost" in message
    budget = read_budget()
    assert budget is not None and budget.active_slots == 0  # refused before any submit


def test_a_price_change_at_fal_is_used_by_the_next_run_and_warned_about(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_rows(tmp_path / "p.jsonl", [f"a pricey kite {unique}"])
    caplog.set_level(logging.INFO)
    summary, state, _ = run(prompt_file=str(path), output_dir=str(tmp_path / "a"))
    assert state == "COMPLETED" and summary.estimated_cost_usd == pytest.approx(0.009)
    assert not [r for r in caplog.records if "built-in table at" in r.getMessage()]

    fal_emulator.platform.set_unit_price(TEXT_TO_IMAGE_ENDPOINT, 0.012)
    caplog.clear()
    path2 = write_rows(tmp_path / "q.jsonl", [f"a pricier kite {unique}"])
    summary, state, _ = run(prompt_file=str(path2), output_dir=str(tmp_path / "b"))
    assert state == "COMPLETED" and summary.estimated_cost_usd == pytest.approx(0.012)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    changes = [m for m in warned if "built-in table at $0.009" in m]
    assert len(changes) == 1 and "$0.012" in changes[0], warned
    # the same price everywhere: the estimate, and so the budget and max_cost
    path3 = write_rows(tmp_path / "r.jsonl", [f"a dear kite {unique}"])
    _, state, message = run(prompt_file=str(path3), output_dir=str(tmp_path / "c"), max_cost=0.01)
    assert state == "FAILED" and message is not None and "$0.012 exceeds max_cost" in message


def test_fal_unreachable_falls_back_to_the_built_in_table_quietly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    use_fal_prices({TEXT_TO_IMAGE_ENDPOINT: 0.02})
    monkeypatch.setenv("PREFECT_GPTIMAGE_FAL_API_URL", "https://127.0.0.1:9")  # nothing there
    caplog.set_level(logging.DEBUG)
    assert load_prices() == "built-in"
    assert price_source() == "built-in"
    assert estimate_cost(GptImageRequest(prompt="a kite", quality="low")) == pytest.approx(0.009)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r for r in caplog.records if "the built-in table" in r.getMessage()]


def test_a_batch_waits_for_the_budget_to_refill_when_asked(
    fal_emulator: FalEmulator, budget_name: str, unique: str, tmp_path: Path
) -> None:
    create_limit(budget_name, 10, decay=1.0)  # room for one row; the next fits ~8 s later
    path = write_rows(tmp_path / "p.jsonl", [f"a patient kite {i} {unique}" for i in range(2)])
    summary, state, _ = run(
        prompt_file=str(path), output_dir=str(tmp_path / "o"), concurrency=1, budget_wait=180
    )
    assert state == "COMPLETED", summary.failures
    assert summary.submitted == 2
