"""The deployments in ``deployments/`` against a real ``prefect server`` started as a subprocess.

* ``prefect.yaml`` parses, its entrypoints load and its parameters are the flows' parameters;
* ``prefect deploy --prefect-file deployments/prefect.yaml --all`` creates its three deployments
  and one automation (read-manifest's trigger), as docs/deployments.md says;
* ``python deployments/serve.py`` serves both; a run of the batch deployment, picked up by the
  served process, generates through the fal emulator and stages images and manifest to S3.

The session's Prefect harness (tests/conftest.py) stays the default API; this module talks to its
own server only inside ``temporary_settings`` blocks.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import httpx
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun, State
from prefect.client.schemas.responses import DeploymentResponse
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.settings import PREFECT_API_URL, temporary_settings
from real_services import free_port

from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
SERVE_SCRIPT = REPO / "deployments" / "serve.py"
PREFECT_CLI = Path(sys.executable).with_name("prefect")

BATCH_FLOW = "gptimage-batch-to-s3"
BATCH_ENTRYPOINT = "flows/batch_to_s3.py:batch_to_s3"
SCHEDULED_FLOW = "gptimage-scheduled-content"
# generous: a loaded 2-core machine has needed ~62 s (3.9.1) to answer /api/health
SERVER_START_TIMEOUT = 240.0
#: Seconds a `prefect` command or a served process may take (it imports Prefect: slow under load)
PROCESS_TIMEOUT = 240.0
T = TypeVar("T")


# -- subprocess helpers ---------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without Prefect's own settings (the harness's must not leak), plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") or k.startswith("PREFECT_GPTIMAGE_")
    }
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``args`` in its own process group (so its children can be stopped with it)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, give it 30 s, then SIGKILL whatever is left of the group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    proc: subprocess.Popen[bytes],
    log: Path,
    timeout: float,
) -> T:
    """Call ``probe`` until it returns something; fail early if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{tail(log)}")
        result = probe()
        if result is not None:
            return result
        time.sleep(0.25)
    pytest.fail(f"{what}: not ready after {timeout:.0f}s\n{tail(log)}")


def flow_run_state(flow_run_id: UUID) -> State[Any] | None:
    """The flow run's state, read through the public client (the current API)."""
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def final_state(
    flow_run_id: UUID, proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> State[Any]:
    """The flow run's state once it is final (fails after ``timeout``, or if ``proc`` dies)."""

    def final() -> State[Any] | None:
        state = flow_run_state(flow_run_id)
        return state if state is not None and state.is_final() else None

    return wait_for("the flow run's final state", final, proc, log, timeout)


def flow_run_logs(flow_run_id: UUID) -> list[str]:
    """The flow run's log messages, read through the public client."""
    with get_client(sync_client=True) as client:
        entries = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [entry.message for entry in entries]


def deploy_to_process_pool(pool: str, name: str, parameters: dict[str, Any]) -> UUID:
    """The process work pool ``pool`` and a batch deployment ``name`` on it, made through the
    public client (the current API) as ``prefect deploy`` with deployments/prefect.yaml makes
    them: a worker runs the flow from this checkout."""
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        deployment_id: UUID = client.create_deployment(
            flow_id=client.create_flow_from_name(BATCH_FLOW),
            name=name,
            work_pool_name=pool,
            entrypoint=BATCH_ENTRYPOINT,
            path=str(REPO),
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": "."}}],
            job_variables={"working_dir": str(REPO)},
            parameters=parameters,
        )
    return deployment_id


def start_worker(pool: str, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """``prefect worker start`` on the process pool ``pool``, polling every second; ``env`` is
    its flow runs' environment too."""
    command = [str(PREFECT_CLI), "worker", "start", "--pool", pool, "--type", "process"]
    return spawn(command, {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}, cwd, log)


def read_deployment(api_url: str, name: str) -> DeploymentResponse | None:
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except (ObjectNotFound, httpx.HTTPError):
            return None


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``prefect server start`` on a free port with its own PREFECT_HOME; yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    log = home / "server.log"
    env = clean_env(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_UI_ENABLED="false",
    )
    proc = spawn(
        [str(PREFECT_CLI), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        home,
        log,
    )
    try:
        api_url = f"http://127.0.0.1:{port}/api"

        def healthy() -> bool | None:
            try:
                return httpx.get(f"{api_url}/health", timeout=5).status_code == 200 or None
            except httpx.HTTPError:
                return None

        wait_for("prefect server", healthy, proc, log, SERVER_START_TIMEOUT)
        yield api_url
    finally:
        stop(proc)


# -- prefect.yaml ---------------------------------------------------------------------------------


def load_project() -> dict[str, Any]:
    project: dict[str, Any] = yaml.safe_load(PREFECT_YAML.read_text())
    return project


def test_prefect_yaml_entrypoints_load_and_take_its_parameters() -> None:
    project = load_project()
    pull = project["pull"]
    assert [next(iter(step)) for step in pull] == [
        "prefect.deployments.steps.set_working_directory"
    ]
    deployments = {d["name"]: d for d in project["deployments"]}
    assert set(deployments) == {"batch-to-s3", "daily-content", "read-manifest"}
    expected = {
        "batch-to-s3": ("flows/batch_to_s3.py:batch_to_s3", BATCH_FLOW),
        "daily-content": ("flows/scheduled_content.py:scheduled_content", SCHEDULED_FLOW),
        # the downstream example; tests/test_events.py runs it from its trigger
        "read-manifest": ("flows/downstream.py:read_manifest", "gptimage-read-manifest"),
    }
    for name, deployment in deployments.items():
        entrypoint, flow_name = expected[name]
        assert deployment["entrypoint"] == entrypoint
        path, _, function = entrypoint.partition(":")
        flow: Flow[..., Any] = load_flow_from_entrypoint(f"{REPO / path}:{function}")
        assert flow.name == flow_name
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment["parameters"]) <= accepted, set(deployment["parameters"]) - accepted
        assert deployment["work_pool"]["name"] == "gptimage-process"
    batch = deployments["batch-to-s3"]["parameters"]
    assert set(batch) == {"prompt_file", "bucket", "prefix", "concurrency"}
    assert (REPO / batch["prompt_file"]).is_file()
    daily = deployments["daily-content"]
    assert {"template", "bucket", "prefix", "quality"} <= set(daily["parameters"])
    assert "{date}" in daily["parameters"]["template"]
    assert daily["schedules"] == [{"cron": "0 6 * * *", "timezone": "UTC", "active": True}]


@pytest.mark.timeout(900)  # starts the module's server, then `prefect deploy`
def test_prefect_deploy_creates_three_deployments_and_an_automation(
    prefect_server: str, tmp_path: Path, s3_bucket: str
) -> None:
    with (
        temporary_settings({PREFECT_API_URL: prefect_server}),
        get_client(sync_client=True) as client,
    ):
        client.create_work_pool(WorkPoolCreate(name="gptimage-process", type="process"))
    env = clean_env(
        PREFECT_API_URL=prefect_server,
        PREFECT_HOME=str(tmp_path / "deploy-home"),
        GPTIMAGE_BUCKET=s3_bucket,
        PWD=str(REPO),
    )
    proc = subprocess.run(
        [
            str(PREFECT_CLI),
            "--no-prompt",
            "deploy",
            "--prefect-file",
            "deployments/prefect.yaml",
            "--all",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    batch = read_deployment(prefect_server, f"{BATCH_FLOW}/batch-to-s3")
    daily = read_deployment(prefect_server, f"{SCHEDULED_FLOW}/daily-content")
    assert batch is not None and daily is not None
    for deployment in (batch, daily):
        assert deployment.work_pool_name == "gptimage-process"
        assert deployment.job_variables == {"working_dir": str(REPO)}
        assert deployment.parameters["bucket"] == s3_bucket
    assert batch.entrypoint == "flows/batch_to_s3.py:batch_to_s3"
    assert batch.parameters["prompt_file"] == "prefect_gptimage/data/sample_prompts.jsonl"
    assert daily.entrypoint == "flows/scheduled_content.py:scheduled_content"
    downstream = read_deployment(prefect_server, "gptimage-read-manifest/read-manifest")
    assert downstream is not None
    assert downstream.entrypoint == "flows/downstream.py:read_manifest"
    with (
        temporary_settings({PREFECT_API_URL: prefect_server}),
        get_client(sync_client=True) as client,
    ):
        automations = client.read_automations()
    runs = [
        a
        for a in automations
        for action in a.actions
        if getattr(action, "deployment_id", None) == downstream.id
    ]
    assert len(runs) == 1 and len(automations) == 1, automations  # the trigger, and nothing else
    assert "prefect-gptimage.batch.completed" in runs[0].trigger.model_dump_json()
    [schedule] = daily.schedules
    assert schedule.active
    assert schedule.schedule.model_dump(include={"cron", "timezone"}) == {
        "cron": "0 6 * * *",
        "timezone": "UTC",
    }


# -- serve.py -------------------------------------------------------------------------------------


@pytest.mark.timeout(900)  # may start the module's server, then serve.py and a flow run
def test_serve_script_runs_the_batch_deployment(
    prefect_server: str,
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    unique: str,
    tmp_path: Path,
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": f"a signal box in snow {unique}", "quality": "low", "num_images": 2},
        {"prompt": f"a ferry at dusk {unique}", "quality": "low", "output_format": "jpeg"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    log = tmp_path / "serve.log"
    env = clean_env(
        **local_s3.env(),
        PREFECT_API_URL=prefect_server,
        PREFECT_HOME=str(tmp_path / "serve-home"),
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        PREFECT_GPTIMAGE_OUTPUT_DIR=str(out),
        GPTIMAGE_BUCKET=s3_bucket,
        GPTIMAGE_PROMPT_FILE=str(prompts),
        GPTIMAGE_PREFIX=f"served-{unique}",
        GPTIMAGE_TEMPLATE="A calendar page for {date}",
        GPTIMAGE_CRON="30 5 * * *",
    )
    assert "FAL_QUEUE_RUN_HOST" in env and "SSL_CERT_FILE" in env and "FAL_KEY" in env
    # from a directory other than the repository's: entrypoints are module paths
    proc = spawn([sys.executable, str(SERVE_SCRIPT)], env, tmp_path, log)
    try:
        batch_name = f"{BATCH_FLOW}/batch-to-s3-served"
        daily_name = f"{SCHEDULED_FLOW}/daily-content-served"
        wait_for(
            "served deployments",
            lambda: (
                read_deployment(prefect_server, daily_name)
                and read_deployment(prefect_server, batch_name)
            ),
            proc,
            log,
            PROCESS_TIMEOUT,
        )
        daily = read_deployment(prefect_server, daily_name)
        assert daily is not None
        [schedule] = daily.schedules
        assert schedule.schedule.model_dump(include={"cron", "timezone"}) == {
            "cron": "30 5 * * *",
            "timezone": "UTC",
        }
        assert daily.parameters == {
            "template": "A calendar page for {date}",
            "bucket": s3_bucket,
            "prefix": "gptimage/daily",
            "quality": "low",
        }

        before = fal_emulator.stats["accepted"]
        with temporary_settings({PREFECT_API_URL: prefect_server}):
            flow_run = run_deployment(
                batch_name, parameters={"concurrency": 4}, timeout=PROCESS_TIMEOUT, poll_interval=1
            )
        assert isinstance(flow_run, FlowRun) and flow_run.state is not None
        assert flow_run.state.is_completed(), f"{flow_run.state}\n{tail(log)}"
        assert flow_run.parameters["prompt_file"] == str(prompts)
        assert fal_emulator.stats["accepted"] == before + 2

        s3 = local_s3.client()
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
        assert keys and all(k.startswith(f"served-{unique}/") for k in keys), keys
        manifests = [k for k in keys if "/manifests/" in k]
        images = [k for k in keys if "/manifests/" not in k]
        assert len(images) == 3 and len(manifests) == 1, keys
        body = s3.get_object(Bucket=s3_bucket, Key=manifests[0])["Body"].read().decode()
        lines = [json.loads(line) for line in body.splitlines()]
        assert len(lines) == 3 and {line["kind"] for line in lines} == {"image"}
        assert {line["s3_uri"] for line in lines} == {f"s3://{s3_bucket}/{k}" for k in images}
        assert any(out.rglob("manifest.jsonl"))
    finally:
        stop(proc)
