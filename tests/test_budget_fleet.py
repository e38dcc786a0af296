"""Two machines, one fleet budget (issue 21's "Done when"): never more than the budget together.

Each "machine" is the real console script in a process of its own, with its own
``PREFECT_HOME`` (its own cache and submit intents), both on one ``prefect server start``
(``PREFECT_API_URL``). The budget is the global concurrency limit of that server, ``--limit 100``
($0.10); each machine's file has 12 rows of $0.009 (24 distinct requests). Started together, they
pay for at most 11 requests together (99 slots), both say the budget held rows back, and nothing
is paid twice. After the limit is raised (the public client's update, as ``prefect gcl update``
does), the same two commands finish all 24 rows, paying only for the ones left.

The fal emulator of this process counts what fal accepted (``accepted``, per prompt).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from real_services import PrefectServer

from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.platform_api import ADMIN_KEY
from prefect_gptimage.testing.s3 import LocalS3Server

pytestmark = pytest.mark.timeout(900)  # two CLI processes, twice, on a loaded machine

CLI = str(Path(sys.executable).with_name("prefect-gptimage"))
ROWS = 12


@pytest.fixture(scope="module", autouse=True)
def _prefect() -> None:
    """No flow runs in this process: the CLI processes report to the module's server."""


def machine_env(server: PrefectServer, name: str, root: Path, budget: str) -> dict[str, str]:
    """A machine: its own Prefect home, the shared server; fal (the emulator) from here."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") or k.startswith("PREFECT_GPTIMAGE_")
    }
    env.update(
        PREFECT_HOME=tempfile.mkdtemp(prefix=f"gptimage-{name}-", dir=root),
        PREFECT_API_URL=server.api_url,
        PREFECT_GPTIMAGE_BUDGET_LIMIT_NAME=budget,
        PREFECT_GPTIMAGE_OUTPUT_DIR=str(root / name / "images"),
    )
    return env


def write_file(path: Path, prompts: list[str]) -> Path:
    rows = [{"prompt": p, "quality": "low", "output_format": "jpeg"} for p in prompts]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def both(commands: list[tuple[list[str], dict[str, str]]]) -> list[dict[str, Any]]:
    """Start every command at once; each one's ``--json`` summary, exit code and stderr."""
    procs = [
        subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c, e in commands
    ]
    out = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=600)
            lines = stdout.strip().splitlines()
            assert lines, f"no output (exit {proc.returncode}):\n{stderr[-4000:]}"
            summary: dict[str, Any] = json.loads(lines[-1])
            summary["returncode"], summary["stderr"] = proc.returncode, stderr
            out.append(summary)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return out


@pytest.fixture
def budget(prefect_server: PrefectServer) -> Iterator[str]:
    """``prefect gcl create <name> --limit 100`` on the shared server (no decay)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    name = f"fal-gpt-image-budget-{uuid.uuid4().hex[:6]}"
    with (
        temporary_settings({PREFECT_API_URL: prefect_server.api_url}),
        get_client(sync_client=True) as client,
    ):
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=100, slot_decay_per_second=0.0)
        )
    yield name


def update_limit(server: PrefectServer, name: str, limit: int) -> int:
    """``prefect gcl update NAME --limit N`` (its public client call); the slots taken so far."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: server.api_url}),
        get_client(sync_client=True) as client,
    ):
        taken = client.read_global_concurrency_limit_by_name(name).active_slots
        if limit:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit))
    return taken


def accepted(emulator: FalEmulator, unique: str) -> Counter[str]:
    return Counter(
        p for r in emulator.requests() if unique in (p := str(r.arguments.get("prompt", "")))
    )


def test_two_runs_on_one_budget_never_spend_more_than_it_together(
    fal_emulator: FalEmulator,
    prefect_server: PrefectServer,
    budget: str,
    local_s3: LocalS3Server,
    s3_bucket: str,
    unique: str,
    tmp_path: Path,
) -> None:
    files = [
        write_file(tmp_path / f"{m}.jsonl", [f"{unique}:{m}: budget row {i}" for i in range(ROWS)])
        for m in ("a", "b")
    ]
    commands = [
        (
            [CLI, "batch", str(path), "--bucket", s3_bucket, "--concurrency", "4", "--json"],
            machine_env(prefect_server, m, tmp_path, budget),
        )
        for m, path in zip(("a", "b"), files, strict=True)
    ]
    first = both(commands)
    paid = accepted(fal_emulator, unique)
    assert sum(paid.values()) <= 11, paid  # $0.099 of $0.100: a 12th would need 9 more slots
    assert set(paid.values()) <= {1}  # nothing paid twice
    for run in first:
        assert run["returncode"] != 0
        held = [f for f in run["failures"] if f["error_type"] == "BudgetExhausted"]
        assert held, run["failures"]
        assert all(budget in f["reason"] for f in held)
        assert "the fleet budget held back" in run["stderr"]
        assert len(held) + run["submitted"] == ROWS
    assert sum(r["submitted"] for r in first) == sum(paid.values())
    assert update_limit(prefect_server, budget, 100000) == 9 * sum(paid.values())  # kept

    # the same two commands, now with fal's admin key: the bill is read back after each run
    billed_env = {"FAL_ADMIN_KEY": ADMIN_KEY, "PREFECT_GPTIMAGE_BILLING_WAIT": "60"}
    second = both([(c, {**e, **billed_env}) for c, e in commands])
    for run in second:
        assert run["returncode"] == 0, (run["failures"], run["stderr"][-3000:])
    again = accepted(fal_emulator, unique)
    assert len(again) == 2 * ROWS and set(again.values()) == {1}  # all 24, each paid once
    left = 2 * ROWS - sum(paid.values())
    assert left >= 13
    assert sum(r["submitted"] for r in second) == left  # only what was left was paid
    assert update_limit(prefect_server, budget, 0) == 9 * 2 * ROWS

    # batch.completed carries the estimate and fal's bill of what each run paid
    bill = fal_emulator.bill()
    for machine, run in zip(("a", "b"), second, strict=True):
        paid_now = [
            r.request_id
            for r in fal_emulator.requests()
            if f"{unique}:{machine}:" in str(r.arguments.get("prompt"))
            and r.arguments["prompt"] not in paid
        ]
        assert len(paid_now) == run["submitted"]
        expected = sum(bill[r] for r in paid_now)
        assert run["costs"] == "billed"
        assert run["billed_cost_usd"] == pytest.approx(expected, abs=1e-6)
        event = completed_event(prefect_server, run["manifest_uri"])
        assert event.payload["billed_cost_usd"] == pytest.approx(expected, abs=1e-6)
        assert event.payload["cost_usd"] == pytest.approx(expected, abs=1e-6)


def completed_event(server: PrefectServer, manifest_uri: str) -> Any:
    """The reconciled run's ``prefect-gptimage.batch.completed`` (the persister flushes every
    few seconds: waited for, generously)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    event_filter = EventFilter(
        event=EventNameFilter(name=["prefect-gptimage.batch.completed"]),
        resource=EventResourceFilter(id=[manifest_uri]),
    )
    deadline = time.monotonic() + 120
    while True:
        with (
            temporary_settings({PREFECT_API_URL: server.api_url}),
            get_client(sync_client=True) as client,
        ):
            events = client.read_events(event_filter, limit=50).events
        billed = [e for e in events if e.payload.get("costs") == "billed"]
        if billed or time.monotonic() > deadline:
            assert billed, [e.payload for e in events]
            return billed[0]
        time.sleep(1)
