"""The CLI's head start (issue 11): fal generates while Prefect's temporary API boots.

Run as a user runs it: ``prefect-gptimage batch`` with no ``PREFECT_API_URL``, on a fresh Prefect
home, against the bundled emulator and the local S3 server. What must hold: the first requests
are submitted before the flow runs and resumed by it (never submitted twice), the cap holds
through the hand-over, and nothing is submitted ahead when the run would be refused (budget,
bucket).
"""

from __future__ import annotations

import contextvars
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from conftest import run_cli_process

from prefect_gptimage.cli._head_start import HEAD_START_NOTE, _Ahead
from prefect_gptimage.prompts import PromptRow
from prefect_gptimage.schemas import GptImageRequest
from prefect_gptimage.tasks.concurrency import hand_over, on_hand_over, release_reserved
from prefect_gptimage.tasks.intents import read_intent
from prefect_gptimage.tasks.queue import sync_client
from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server


def _fresh_env(tmp_path: Path, home: str) -> dict[str, str]:
    """A user's environment: no Prefect API, a Prefect home that does not exist yet."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH")
    }
    env["PREFECT_HOME"] = str(tmp_path / home)
    env["PREFECT_GPTIMAGE_OUTPUT_DIR"] = str(tmp_path / "images")
    return env


def _rows(tmp_path: Path, unique: str, n: int) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"tile {i} {unique}", "quality": "low"}) + "\n" for i in range(n)
        )
    )
    return str(path)


def _ours(emulator: FalEmulator, unique: str) -> list[Any]:
    return [r for r in emulator.requests() if unique in str(r.arguments.get("prompt"))]


def _peak_alive(requests: list[Any]) -> int:
    events = sorted(
        [(r.submitted_at, 1) for r in requests] + [(r.completed_at, -1) for r in requests]
    )
    alive = peak = 0
    for _, delta in events:
        alive += delta
        peak = max(peak, alive)
    return peak


def test_first_requests_are_submitted_while_prefect_starts_and_resumed_by_the_flow(
    fal_emulator: FalEmulator, local_s3: LocalS3Server, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    fal_emulator.set_latency(0.5)
    env = _fresh_env(tmp_path, "home")
    args = ["batch", _rows(tmp_path, unique, 8), "--bucket", s3_bucket, "--json"]
    args += ["--concurrency", "2", "--lookahead", "1", "--verbose"]

    done = run_cli_process(args, env)

    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["staged"] == 8 and summary["failures"] == []
    requests = _ours(fal_emulator, unique)
    assert sorted(Counter(str(r.arguments["prompt"]) for r in requests).values()) == [1] * 8
    # the cap's 2 + 1 slots were filled ahead of the flow and refilled as requests completed
    # (a fresh home boots for seconds; a request takes 0.5 s), each resumed once, not resent
    # (how many depends on the race between the server's boot and fal: see the next test)
    resumed = done.stderr.count(HEAD_START_NOTE)
    assert 3 <= resumed <= 8, done.stderr[-3000:]
    assert _peak_alive(requests) <= 3  # the cap held, ahead and through the hand-over

    again = run_cli_process(args, env)

    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["submitted"] == 0
    assert HEAD_START_NOTE not in again.stderr
    assert len(_ours(fal_emulator, unique)) == 8

    # generate, on the home the batch created (its database has no global limit): the same
    one = run_cli_process(
        ["generate", f"a lone tile {unique}", "--quality", "low", "--verbose"], env
    )

    assert one.returncode == 0, one.stderr[-3000:]
    assert one.stderr.count(HEAD_START_NOTE) == 1, one.stderr[-3000:]
    assert len(_ours(fal_emulator, unique)) == 9


def test_nothing_is_submitted_ahead_of_a_refused_run(
    fal_emulator: FalEmulator, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    env = _fresh_env(tmp_path, "home")
    rows = _rows(tmp_path, unique, 3)

    no_bucket = run_cli_process(["batch", rows, "--bucket", f"missing-{unique}"], env)
    over_budget = run_cli_process(
        ["batch", rows, "--bucket", s3_bucket, "--max-cost", "0.001"], env
    )

    assert no_bucket.returncode != 0 and "missing-" in no_bucket.stderr
    assert "Traceback" not in no_bucket.stderr, no_bucket.stderr[-3000:]
    assert over_budget.returncode != 0 and "max_cost" in over_budget.stderr
    assert _ours(fal_emulator, unique) == []


def test_the_head_start_refills_each_freed_slot_until_the_hand_over(
    fal_emulator: FalEmulator, unique: str
) -> None:
    """What the CLI runs while Prefect boots, timed by nothing but fal: cap 2, 8 rows. Each
    completion hands its slot to the next row; the hand-over stops it with every submit
    recorded; nothing is ever sent twice, and never more than the cap is alive at fal."""
    fal_emulator.set_latency(0.3)
    rows = [
        PromptRow(line=i + 1, request=GptImageRequest(prompt=f"tile {i} {unique}", quality="low"))
        for i in range(8)
    ]
    ahead = _Ahead(rows, sync_client(None), False, 2, 0)
    ahead.budget = 6  # the 7th and 8th rows are the flow's
    on_hand_over(ahead.stop)
    try:
        sent = [(row, ahead.send(row)) for row in ahead.reserve(8)]
        assert len(sent) == 2  # the cap
        threads = [  # as the CLI starts them: in a copy of this context (the same store)
            threading.Thread(target=contextvars.copy_context().run, args=(ahead.keep_busy, *pair))
            for pair in sent
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(_ours(fal_emulator, unique)) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        hand_over()
        submitted = len(_ours(fal_emulator, unique))
        time.sleep(1.0)  # a completion after the hand-over frees a slot, sends nothing
        ahead.quit()
        for thread in threads:
            thread.join(10)
    finally:
        ahead.quit()
        release_reserved()

    requests = _ours(fal_emulator, unique)
    assert submitted == len(requests) == 6
    assert sorted(Counter(str(r.arguments["prompt"]) for r in requests).values()) == [1] * 6
    assert _peak_alive(requests) <= 2
    intents = [read_intent(row.request, row.variant) for row in rows]
    states = [i.state if i else None for i in intents]
    assert states == ["submitted"] * 6 + [None, None], states


def test_a_database_still_being_created_has_no_global_limit(tmp_path: Path) -> None:
    """The temporary server creates the home's database while the head start looks: a file with
    no tables yet cannot hold a limit (the head start goes ahead); one with the limit can."""
    import sqlite3
    from contextlib import closing

    from prefect_gptimage.cli._head_start import _may_have_global_limit

    db = tmp_path / "prefect.db"
    url = f"sqlite+aiosqlite:///{db}"
    assert _may_have_global_limit(url, "fal-gpt-image") is False  # no file yet
    sqlite3.connect(db).close()
    assert _may_have_global_limit(url, "fal-gpt-image") is False  # created, not migrated
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE concurrency_limit_v2 (name TEXT, active BOOLEAN)")
        conn.execute("INSERT INTO concurrency_limit_v2 VALUES ('fal-gpt-image', 1)")
        conn.commit()
    assert _may_have_global_limit(url, "fal-gpt-image") is True
    assert _may_have_global_limit(url, "another-limit") is False
