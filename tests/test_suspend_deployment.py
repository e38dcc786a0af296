"""A deployment run of the batch flow suspends while fal works and is resumed by the receiver
(issue 20, "Done when": suspended deployment runs on a process worker).

The batch deployment is created on a process work pool of the session's Prefect API (a real
server) and run by ``prefect worker start --type process``, with ``PREFECT_GPTIMAGE_WEBHOOK_URL``
pointing at the receiver (``prefect-gptimage webhooks serve`` in its own process, the same
result storage and API) and ``PREFECT_GPTIMAGE_WEBHOOK_SUSPEND=true``. The emulator runs each
request for a while and then delivers its signed callback to the receiver. A flow run of the
deployment, created with the public client, submits its first wave (the cap: 3 of its 5 rows)
and suspends: Prefect's API shows it PAUSED "Suspended" on that wave's pause key, no process of
that flow run is alive, and fal has not finished the wave. The receiver resumes it once the
wave's callbacks are recorded; the worker runs it again (a fresh process), it submits the second
wave and suspends again; resumed once more, it stages every row and ends COMPLETED, with every
row submitted to fal exactly once and counted as paid by that run.

A second run loses every callback of its first wave (the emulator drops them): the receiver's
periodic pass resumes it once that waiter is older than ``PREFECT_GPTIMAGE_WEBHOOK_SWEEP_AFTER``;
its second wave's callbacks resume it again, and the first wave's rows sweep (poll fal) and
stage, still paid once.

The race (every callback recorded between the run's last read of the records and its suspend,
so no callback comes after it) is set up through the public client: the receiver's periodic pass
resumes that run, and not a run still missing a callback.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, State
from prefect.deployments import run_deployment
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter
from prefect.states import Cancelled, Running, Suspended
from real_services import free_port
from test_deployments import (
    PROCESS_TIMEOUT,
    clean_env,
    deploy_to_process_pool,
    final_state,
    flow_run_logs,
    flow_run_state,
    start_worker,
    stop,
    tail,
    wait_for,
)
from test_webhooks import Receiver

from prefect_gptimage.engine.options import RunOptions
from prefect_gptimage.engine.suspend import suspending_run
from prefect_gptimage.tasks.callbacks import FalCallback, record_callback
from prefect_gptimage.tasks.waiters import Waiter, suspend_key, write_waiter
from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server
from prefect_gptimage.testing.webhooks import JWKS_PATH, WebhookFault

ROWS = 5
CAP = 3  # the deployment's ``concurrency``: a wave
WAVES = -(-ROWS // CAP)  # 3 rows, then 2
#: Seconds fal runs each request: the run suspends well inside it (a deadline, not a bound)
FAL_LATENCY = 30.0
#: Generous: every flow-run process imports Prefect (slow on a loaded machine)
STATE_TIMEOUT = 300.0
#: The sweep delay of the lost-callbacks case (runs and receiver): long enough to see the run
#: Suspended and its process gone, short enough for a test
SHORT_SWEEP_AFTER = 45.0
BATCH_COMPLETED = "prefect-gptimage.batch.completed"

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/environ").exists(), reason="reads processes' environments from /proc"
)


def _suspended(flow_run_id: UUID, wave: int | None = None) -> State[Any] | None:
    """The run's state if it is Suspended (on ``wave``'s pause key, when given), else None."""
    state = flow_run_state(flow_run_id)
    if state is None or state.type.value != "PAUSED" or state.name != "Suspended":
        return None
    if wave is not None and state.state_details.pause_key != suspend_key(wave):
        return None
    return state


def _run_processes(flow_run_id: UUID) -> list[int]:
    """Live processes of the flow run: those whose environment names it (Prefect's runner
    starts each flow run's process with ``PREFECT__FLOW_RUN_ID``); a zombie has none."""
    marker = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _completed_event(flow_run_id: UUID) -> Any:
    """The run's ``prefect-gptimage.batch.completed`` event, once the API has it (or None)."""
    event_filter = EventFilter(
        event=EventNameFilter(name=[BATCH_COMPLETED]),
        related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
    )
    with get_client(sync_client=True) as client:
        events = client.read_events(event_filter, limit=5).events
    return events[0] if events else None


def _scenario(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    api_url: str,
    tmp_path: Path,
    name: str,
    settings: dict[str, str],
    on_suspended: Callable[[int, list[Any], frozenset[str]], None] | None = None,
) -> dict[str, Any]:
    """Deploy the batch flow to a process work pool with suspending on, start a worker, run the
    deployment once through the API, and check what every case shows: for each wave, Suspended
    on that wave's key with no process of the run alive and only the waves so far submitted;
    resumed by the receiver; COMPLETED with every row staged and submitted to fal exactly once.
    ``on_suspended(wave, ours, delivered)`` checks more while it is suspended. What the run did,
    for more checks."""
    prompt_file = tmp_path / "rows.jsonl"
    prompts = [f"suspended deployment row {i} {name}" for i in range(ROWS)]
    prompt_file.write_text(
        "".join(json.dumps({"prompt": p, "quality": "low"}) + "\n" for p in prompts)
    )
    results = tmp_path / "results"  # the storage the runs and the receiver share
    prefix = f"worker-suspend-{name}"
    receiver = Receiver(
        free_port(),
        clean_env(
            PREFECT_API_URL=api_url,
            PREFECT_HOME=str(tmp_path / "receiver-home"),
            PREFECT_LOCAL_STORAGE_PATH=str(results),
            PREFECT_GPTIMAGE_FAL_JWKS_URL=fal_emulator.base_url + JWKS_PATH,
            **settings,
        ),
        tmp_path / "receiver.log",
    ).start()
    pool = f"gptimage-suspend-{name}"
    parameters = {"prompt_file": str(prompt_file), "bucket": s3_bucket, "prefix": prefix}
    deployment_id = deploy_to_process_pool(
        pool, f"suspend-{name}", {**parameters, "concurrency": CAP}
    )
    log = tmp_path / "worker.log"
    env = clean_env(  # the worker's environment is its flow runs'
        **local_s3.env(),
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(tmp_path / "worker-home"),
        PREFECT_LOCAL_STORAGE_PATH=str(results),
        PREFECT_GPTIMAGE_OUTPUT_DIR=str(tmp_path / "out"),
        PREFECT_GPTIMAGE_WEBHOOK_URL=receiver.url,
        PREFECT_GPTIMAGE_WEBHOOK_SUSPEND="true",
        **settings,
    )
    proc = start_worker(pool, env, tmp_path, log)
    try:
        flow_run = run_deployment(deployment_id, timeout=0)
        assert isinstance(flow_run, FlowRun)
        for wave in range(WAVES):
            seen: set[int] = set()

            def suspended(wave: int = wave, seen: set[int] = seen) -> State[Any] | None:
                seen.update(_run_processes(flow_run.id))  # the run's process, while it lives
                return _suspended(flow_run.id, wave)

            wait_for(f"the flow run Suspended on wave {wave}", suspended, proc, log, STATE_TIMEOUT)
            # its process ends (Prefect's Pause): wait for it, then look again
            wait_for(
                "the flow run's process to end",
                lambda seen=seen: (
                    (not _run_processes(flow_run.id) and not any(map(_alive, seen))) or None
                ),
                proc,
                log,
                PROCESS_TIMEOUT,
            )
            ours = [r for r in fal_emulator.requests() if r.arguments.get("prompt") in prompts]
            delivered = fal_emulator.webhooks.stats.delivered_ids
            still = _suspended(flow_run.id, wave)
            print(
                f"{name}: suspended on wave {wave}, {len(seen)} process(es) seen, now none; "
                f"{len(ours)} submit(s), {len({r.request_id for r in ours} & delivered)} "
                "callback(s) delivered"
            )
            assert still is not None, f"not Suspended: {flow_run_state(flow_run.id)}\n{tail(log)}"
            assert seen, "the flow run's process was never seen"
            assert len(ours) == min(ROWS, CAP * (wave + 1)), "one wave more per suspend"
            assert proc.poll() is None, "the worker stays up"
            if on_suspended is not None:
                on_suspended(wave, ours, delivered)

        state = final_state(flow_run.id, proc, log, STATE_TIMEOUT * 2)
        assert state.is_completed(), f"{state}\n{tail(log)}\n{tail(receiver.log)}"
        with get_client(sync_client=True) as client:
            history = [s.name for s in client.read_flow_run_states(flow_run.id)]
        print(f"{name}: states {history}")
        assert history.count("Suspended") == WAVES and history[-1] == "Completed", history
        stats = receiver.stats()
        print(f"{name}: receiver {stats}")
        assert stats["resumed"] == WAVES
        resumed = [ln for ln in receiver.log.read_text().splitlines() if "resumed flow run" in ln]
        assert len(resumed) == WAVES, tail(receiver.log)  # the receiver's output says so

        def run_logs() -> list[str] | None:  # once the engine's "swept N of M" line is in
            messages = flow_run_logs(flow_run.id)
            return messages if any(" swept " in m for m in messages) else None

        logs = wait_for("the run's logs", run_logs, proc, log, PROCESS_TIMEOUT)
        completed = wait_for(
            "the run's batch.completed event",
            lambda: _completed_event(flow_run.id),
            proc,
            log,
            PROCESS_TIMEOUT,
        )
    finally:
        stop(proc)
        receiver.kill()

    # every row staged, each paid exactly once (the waves' submits were not sent again) and
    # counted as paid by this run (its summary), though the resumed processes found them recorded
    s3 = local_s3.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    images = [k for k in keys if k.startswith(f"{prefix}/") and "/manifests/" not in k]
    assert len(images) == ROWS, keys
    ours = [r for r in fal_emulator.requests() if r.arguments.get("prompt") in prompts]
    assert Counter(r.arguments["prompt"] for r in ours) == Counter(prompts)
    assert all(r.succeeded for r in ours)
    payload = completed.payload
    print(f"{name}: batch.completed {payload}")
    assert (payload["images"], payload["submitted"], payload["cached"]) == (ROWS, ROWS, 0)
    assert payload["estimated_cost_usd"] == pytest.approx(payload["cost_usd"])
    return {"payload": payload, "receiver": stats, "logs": logs}


@pytest.fixture
def deployed_batch(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    prefect_harness: dict[str, Any],
    tmp_path: Path,
) -> Callable[..., dict[str, Any]]:
    """:func:`_scenario` on this test's emulator, bucket, Prefect API and folder."""
    api_url = str(prefect_harness["api_url"])
    return partial(_scenario, fal_emulator, local_s3, s3_bucket, api_url, tmp_path)


@pytest.mark.timeout(900)  # the receiver, a worker and three processes of the flow run
def test_a_deployment_run_suspends_while_fal_works_and_the_receiver_resumes_it(
    deployed_batch: Callable[..., dict[str, Any]], fal_emulator: FalEmulator, unique: str
) -> None:
    fal_emulator.configure(latency=FAL_LATENCY)
    fal_emulator.webhooks.retry_delays = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)

    def fal_still_working(wave: int, ours: list[Any], delivered: frozenset[str]) -> None:
        assert not {r.request_id for r in ours} <= delivered, "fal had finished already"

    done = deployed_batch(unique, {}, fal_still_working)
    assert done["receiver"]["recorded"] == ROWS


@pytest.mark.timeout(900)
def test_a_run_whose_callbacks_are_all_lost_is_resumed_after_the_sweep_delay_and_sweeps(
    deployed_batch: Callable[..., dict[str, Any]], fal_emulator: FalEmulator, unique: str
) -> None:
    fal_emulator.configure(latency=2.0)
    dropped = fal_emulator.webhooks.inject(WebhookFault("drop", count=CAP))

    def slower_second_wave(wave: int, ours: list[Any], delivered: frozenset[str]) -> None:
        if wave == 0:  # the second wave suspends too (its callbacks come after it suspended)
            fal_emulator.configure(latency=FAL_LATENCY)

    try:
        done = deployed_batch(
            f"lost-{unique}",
            {"PREFECT_GPTIMAGE_WEBHOOK_SWEEP_AFTER": str(SHORT_SWEEP_AFTER)},
            slower_second_wave,
        )
    finally:
        fal_emulator.webhooks.clear_faults()
    assert dropped.fired == CAP
    # resumed by the receiver's pass at the sweep delay (no callback of the first wave came), then
    # on the second wave's callbacks; the first wave's rows polled fal, the rest read callbacks
    assert done["receiver"]["recorded"] == ROWS - CAP
    assert any(f"swept {CAP} of {ROWS}" in m for m in done["logs"]), done["logs"]


def _flow_run_of_a_deployment(client: Any, unique: str) -> UUID:
    """A flow run of a new deployment, Running (as a run is when it suspends)."""
    flow_id = client.create_flow_from_name(f"gptimage-race-{unique}")
    deployment_id = client.create_deployment(flow_id=flow_id, name="race")
    run = client.create_flow_run_from_deployment(deployment_id)
    client.set_flow_run_state(run.id, Running(), force=True)
    run_id: UUID = run.id
    return run_id


@pytest.mark.timeout(600)  # the receiver process imports Prefect: minutes under load
def test_the_receivers_pass_resumes_a_run_that_suspended_after_its_callbacks_were_recorded(
    fal_emulator: FalEmulator, prefect_harness: dict[str, Any], unique: str, tmp_path: Path
) -> None:
    """The race: every callback of the wave is recorded after the run's last read of the
    records and before its suspend, so no callback comes to resume it. The receiver's periodic
    pass does; a run still missing a callback stays Suspended."""
    receiver = Receiver(
        free_port(),
        clean_env(
            PREFECT_API_URL=str(prefect_harness["api_url"]),
            PREFECT_HOME=str(tmp_path / "receiver-home"),
            PREFECT_LOCAL_STORAGE_PATH=str(prefect_harness["storage"]),  # this process's too
            PREFECT_GPTIMAGE_FAL_JWKS_URL=fal_emulator.base_url + JWKS_PATH,
        ),
        tmp_path / "receiver.log",
    ).start()
    runs: list[UUID] = []
    try:
        done, waiting = str(uuid4()), str(uuid4())
        with get_client(sync_client=True) as client:
            raced = _flow_run_of_a_deployment(client, f"{unique}-raced")
            other = _flow_run_of_a_deployment(client, f"{unique}-other")
            runs += [raced, other]
            # the run wrote its waiter and found no callback...
            write_waiter(Waiter(flow_run_id=str(raced), request_ids=(done,)))
            write_waiter(Waiter(flow_run_id=str(other), request_ids=(waiting,)))
            record_callback(FalCallback(request_id=done, status="OK", payload={"images": []}))
            for run_id in (raced, other):  # ... then suspended, its callback recorded meanwhile
                suspend: State[Any] = Suspended(timeout_seconds=600, pause_key=suspend_key(0))
                assert client.set_flow_run_state(run_id, suspend).status.value == "ACCEPT"
        assert receiver.proc is not None
        left = wait_for(
            "the raced run resumed",
            lambda: None if _suspended(raced) else flow_run_state(raced),
            receiver.proc,
            receiver.log,
            PROCESS_TIMEOUT,
        )
        print(f"raced run: {left.name}; receiver {receiver.stats()}")
        stats = receiver.stats()
        assert stats["received"] == 0 and stats["resumed"] == 1  # no callback came: the pass
        assert _suspended(other) is not None, "a run still missing a callback was resumed"
    finally:
        receiver.kill()
        with get_client(sync_client=True) as client:  # no later receiver of the session finds them
            for run_id in runs:
                client.set_flow_run_state(run_id, Cancelled(), force=True)


def test_only_a_deployment_run_with_both_settings_may_suspend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Everything else runs as before: no flow run, a flow run of no deployment, or a setting
    missing, never suspends (the deployed cases above are the deployment runs that do)."""

    @flow
    def may_suspend() -> UUID | None:
        return suspending_run(RunOptions())

    monkeypatch.setenv("PREFECT_GPTIMAGE_WEBHOOK_URL", "http://127.0.0.1:9/fal/webhook")
    monkeypatch.setenv("PREFECT_GPTIMAGE_WEBHOOK_SUSPEND", "true")
    assert suspending_run(RunOptions()) is None  # not in a flow run
    assert may_suspend() is None  # a flow run of no deployment
    monkeypatch.delenv("PREFECT_GPTIMAGE_WEBHOOK_URL")
    assert may_suspend() is None
