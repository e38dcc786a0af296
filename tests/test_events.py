"""Events, assets and a triggered downstream deployment, against a real Prefect server.

One ``prefect server start`` (SQLite, its event persister and trigger services running) serves
the module. The batch runs as users run it, ``prefect-gptimage batch`` in a subprocess reporting
to that server, against the fal emulator and the moto S3 server:

* a 10-image batch emits one ``prefect-gptimage.image.staged`` per image and one
  ``prefect-gptimage.batch.completed``, read back from the server's events API;
* it records one asset materialization per image, keyed by the image's ``s3://`` URI, plus one
  for the manifest;
* the automation made from ``deployments/prefect.yaml``'s trigger (given to the downstream
  deployment, served by a subprocess, whose runner creates it as ``prefect deploy`` would) runs
  that deployment with the manifest URI, and the run completes having read the 10 images;
* an edit of a staged image has the source image's asset as upstream;
* a batch refused by ``--max-cost`` emits ``prefect-gptimage.spend.refused``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventRelatedFilter,
    EventResourceFilter,
)
from prefect.events.schemas.events import Event
from prefect.settings import PREFECT_API_URL, temporary_settings
from real_services import PrefectServer

from prefect_gptimage.reporting.events import BATCH_COMPLETED, IMAGE_STAGED, SPEND_REFUSED
from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
MATERIALIZED = "prefect.asset.materialization.succeeded"
SERVED = "read-manifest-served"
T = TypeVar("T")


@pytest.fixture(scope="module")
def server() -> Iterator[PrefectServer]:
    """One real Prefect server (SQLite) for the module: API, event persister, triggers."""
    with PrefectServer() as api:
        yield api


def env_for(api: PrefectServer, local_s3: LocalS3Server, tmp: Path, name: str) -> dict[str, str]:
    """A child's environment: this server, the emulator (inherited), moto, its own home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(local_s3.env())
    env.update(
        PREFECT_API_URL=api.api_url,
        PREFECT_HOME=str(tmp / f"home-{name}"),
        PREFECT_LOCAL_STORAGE_PATH=str(tmp / f"results-{name}"),
        PREFECT_GPTIMAGE_OUTPUT_DIR=str(tmp / f"out-{name}"),
        PREFECT_GPTIMAGE_RETRY_MAX_DELAY="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect_gptimage.cli", *args]


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
            return


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = 240) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail(f"{proc.args!r} did not finish:\n{log.read_text(errors='replace')[-4000:]}")
    return log.read_text(errors="replace")


def summary_of(output: str) -> dict[str, Any]:
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    pytest.fail(f"no JSON summary in:\n{output[-4000:]}")


def wait_until(
    what: str, probe: Callable[[], T | None], timeout: float = 120, logs: tuple[Path, ...] = ()
) -> T:
    """``probe()`` once it is not None; the timeout is a generous deadline (a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {p}:\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
            pytest.fail(f"{what}: not seen after {timeout:.0f}s{tails}")
        time.sleep(0.5)


def read_events(api: PrefectServer, name: str, **filters: Any) -> list[Event]:
    """Every event called ``name`` matching ``filters`` (all pages)."""
    event_filter = EventFilter(event=EventNameFilter(name=[name]), **filters)
    with temporary_settings({PREFECT_API_URL: api.api_url}), get_client(sync_client=True) as client:
        page = client.read_events(event_filter, limit=50)
        found = list(page.events)
        while page.next_page:
            page = client.read_events_page(str(page.next_page))
            found.extend(page.events)
    return found


def wait_events(api: PrefectServer, name: str, count: int, **filters: Any) -> list[Event]:
    """The events once ``count`` of them are stored (the persister flushes every few seconds).
    (Whether more arrive later is checked again at the end of the test.)"""
    wait_until(f"{count} {name}", lambda: read_events(api, name, **filters)[count - 1 :] or None)
    return read_events(api, name, **filters)


def related_ids(event: Event, role: str) -> list[str]:
    return [r.id for r in event.related if r.role == role]


def downstream_trigger_spec() -> dict[str, Any]:
    project = yaml.safe_load(PREFECT_YAML.read_text())
    [deployment] = [d for d in project["deployments"] if d["name"] == "read-manifest"]
    [trigger] = deployment["triggers"]
    return dict(trigger)


# The downstream deployment, served by a subprocess with the trigger prefect.yaml gives it: the
# runner creates the automation as `prefect deploy` does (and serving a deployment replaces the
# automations it owns, so one made beforehand through the API would be deleted here).
SERVE = f"""
import yaml
from pydantic import TypeAdapter
from prefect import serve
from prefect.events import DeploymentTriggerTypes
from prefect.types.entrypoint import EntrypointType
from prefect_gptimage.flows.downstream import read_manifest

project = yaml.safe_load(open({str(PREFECT_YAML)!r}))
[spec] = [d for d in project["deployments"] if d["name"] == "read-manifest"][0]["triggers"]
spec.setdefault("name", "{SERVED}__automation_1")  # as `prefect deploy` names it
trigger = TypeAdapter(DeploymentTriggerTypes).validate_python(spec)
serve(
    read_manifest.to_deployment(
        name={SERVED!r}, entrypoint_type=EntrypointType.MODULE_PATH, triggers=[trigger]
    )
)
"""


def served_automation(api: PrefectServer) -> tuple[Any, Any] | None:
    """(deployment id, automation) once the served deployment's automation exists."""
    with temporary_settings({PREFECT_API_URL: api.api_url}), get_client(sync_client=True) as client:
        automations = client.read_automations_by_name(f"{SERVED}__automation_1")
        if not automations:
            return None
        deployment = client.read_deployment_by_name(f"gptimage-read-manifest/{SERVED}")
        return deployment.id, automations[0]


def start_edit(
    api: PrefectServer, local_s3: LocalS3Server, bucket: str, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], Path, str]:
    """``prefect-gptimage generate --edit-image <presigned URL of an object of the bucket>``."""
    source_key = f"mine/source-{uuid.uuid4().hex[:10]}.png"
    s3 = local_s3.client()
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(png, format="PNG")
    s3.put_object(Bucket=bucket, Key=source_key, Body=png.getvalue())
    source_url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": source_key}, ExpiresIn=3600
    )
    log = tmp_path / "edit.log"
    args = ["generate", f"the same at night {source_key}", "--edit-image", source_url]
    args += ["--quality", "low", "--bucket", bucket, "--json"]
    proc = spawn(cli(*args), env_for(api, local_s3, tmp_path, "edit"), log)
    return proc, log, f"s3://{bucket}/{source_key}"


def check_edit(api: PrefectServer, proc: subprocess.Popen[bytes], log: Path, source: str) -> None:
    """The edit's asset has the source image's asset as upstream."""
    output = finish(proc, log)
    assert proc.returncode == 0, output[-4000:]
    [image] = summary_of(output)["images"]
    edited = EventResourceFilter(id=[image["s3_uri"]])
    [event] = wait_events(api, MATERIALIZED, 1, resource=edited)
    assert related_ids(event, "asset") == [source]
    assert event.payload["inputs"] == [source]
    assert event.payload["endpoint"] == "fal-ai/gpt-image-1.5/edit"
    [staged] = wait_events(api, IMAGE_STAGED, 1, resource=edited)
    assert related_ids(staged, "fal-request") == [f"fal.request.{image['request_id']}"]
    referenced = read_events(
        api, "prefect.asset.referenced", resource=EventResourceFilter(id=[source])
    )
    assert len(referenced) == 1


@pytest.mark.timeout(900)  # a real Prefect server, a served deployment, two CLI runs
def test_batch_events_assets_lineage_and_triggered_downstream_run(
    server: PrefectServer,
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    unique = uuid.uuid4().hex[:10]
    prompts = tmp_path / "signs.jsonl"
    rows = [{"prompt": f"sign {i} of {unique}", "quality": "low"} for i in range(10)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused = tmp_path / "refused.jsonl"
    refused.write_text(json.dumps({"prompt": f"too dear {unique}", "quality": "high"}) + "\n")

    serve_log, batch_log, refused_log = (tmp_path / f"{n}.log" for n in ("serve", "batch", "no"))
    serving = spawn(
        [sys.executable, "-c", SERVE], env_for(server, local_s3, tmp_path, "serve"), serve_log
    )
    try:
        no = spawn(
            cli("batch", str(refused), "--bucket", s3_bucket, "--max-cost", "0", "--json"),
            env_for(server, local_s3, tmp_path, "refused"),
            refused_log,
        )
        deployment_id, automation = wait_until(
            "the served deployment's automation",
            lambda: served_automation(server),
            timeout=240,
            logs=(serve_log,),
        )
        assert automation.enabled and automation.trigger.expect == {BATCH_COMPLETED}
        [action] = automation.actions
        assert action.parameters == downstream_trigger_spec()["parameters"]
        assert action.parameters == {"manifest_uri": "{{ event.resource.id }}"}
        batch = spawn(
            cli("batch", str(prompts), "--bucket", s3_bucket, "--prefix", "ev", "--json"),
            env_for(server, local_s3, tmp_path, "batch"),
            batch_log,
        )
        output = finish(batch, batch_log)
        assert batch.returncode == 0, output[-4000:]
        edit, edit_log, source = start_edit(server, local_s3, s3_bucket, tmp_path)  # meanwhile
        summary = summary_of(output)
        assert summary["staged"] == 10 and summary["submitted"] == 10, summary
        manifest_uri = summary["manifest_uri"]
        assert manifest_uri.startswith(f"s3://{s3_bucket}/ev/manifests/"), manifest_uri
        images = {i["s3_uri"]: i for i in summary["images"]}
        assert len(images) == 10 and all(u.startswith(f"s3://{s3_bucket}/ev/") for u in images)

        # one image.staged per image: resource = its s3:// URI; related: flow run, fal request
        in_bucket = EventResourceFilter(id_prefix=[f"s3://{s3_bucket}/"])
        staged = wait_events(server, IMAGE_STAGED, 10, resource=in_bucket)
        assert sorted(e.resource.id for e in staged) == sorted(images)
        [flow_run] = {r for e in staged for r in related_ids(e, "flow-run")}
        assert flow_run.startswith("prefect.flow-run.")
        for event in staged:
            image = images[event.resource.id]
            assert related_ids(event, "fal-request") == [f"fal.request.{image['request_id']}"]
            assert related_ids(event, "manifest") == [manifest_uri]
            payload = event.payload
            assert payload["sha256"] == image["sha256"] and payload["bytes"] == image["bytes"]
            assert payload["endpoint"] == "fal-ai/gpt-image-1.5"
            assert payload["request_id"] == image["request_id"]
            assert payload["estimated_cost_usd"] > 0 and payload["cached"] is False
        # "the images of this manifest" is one events query, however large the batch
        by_manifest = read_events(
            server, IMAGE_STAGED, related=EventRelatedFilter(id=[manifest_uri], role=["manifest"])
        )
        assert sorted(e.resource.id for e in by_manifest) == sorted(images)

        # one batch.completed: resource = the manifest's URI, totals and cost in the payload
        [completed] = wait_events(
            server, BATCH_COMPLETED, 1, resource=EventResourceFilter(id=[manifest_uri])
        )
        assert related_ids(completed, "flow-run") == [flow_run]
        payload = completed.payload
        assert (payload["images"], payload["failed"], payload["submitted"]) == (10, 0, 10)
        assert payload["cached"] == 0 and payload["ok"] is True
        assert payload["cost_usd"] == pytest.approx(summary["estimated_cost_usd"])
        assert payload["estimated_cost_usd"] == pytest.approx(payload["cost_usd"])

        # one asset materialization per image, keyed by its s3:// URI; and the manifest's
        materialized = wait_events(server, MATERIALIZED, 11, resource=in_bucket)
        by_key = {e.resource.id: e for e in materialized}
        assert len(materialized) == 11 and set(by_key) == {*images, manifest_uri}
        for uri, image in images.items():
            metadata = by_key[uri].payload
            assert metadata["sha256"] == image["sha256"] and metadata["bytes"] == image["bytes"]
            assert metadata["request_id"] == image["request_id"]
            assert (metadata["quality"], metadata["size"], metadata["format"]) == (
                "low",
                "1024x1024",
                "png",
            )
            assert len(metadata["prompt_sha256"]) == 64 and metadata["estimated_cost_usd"] > 0
            assert metadata["manifest_uri"] == manifest_uri
            assert related_ids(by_key[uri], "flow-run") == [flow_run]
        assert by_key[manifest_uri].payload["images"] == 10

        # the automation from prefect.yaml's trigger runs the downstream deployment, which
        # reads the manifest and completes
        def downstream_run() -> FlowRun | None:
            with (
                temporary_settings({PREFECT_API_URL: server.api_url}),
                get_client(sync_client=True) as client,
            ):
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
                )
            done = [r for r in runs if r.state is not None and r.state.is_final()]
            return done[0] if done else None

        run = wait_until(
            "the triggered downstream run",
            downstream_run,
            timeout=240,
            logs=(serve_log, server.log),
        )
        assert run.parameters == {"manifest_uri": manifest_uri}
        assert run.state is not None and run.state.is_completed(), (
            f"{run.state}\n{serve_log.read_text(errors='replace')[-4000:]}"
        )

        def read_ten() -> bool | None:  # its log line (logs are shipped in batches)
            with (
                temporary_settings({PREFECT_API_URL: server.api_url}),
                get_client(sync_client=True) as client,
            ):
                logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            line = f"{manifest_uri}: 10 image(s), 0 failure(s)"
            return any(line in log.message for log in logs) or None

        wait_until("the downstream run's log line", read_ten, timeout=120, logs=(serve_log,))

        # the budget guard's refusal is an event too
        refused_output = finish(no, refused_log)
        assert no.returncode != 0 and summary_of(refused_output)["submitted"] == 0
        events = wait_events(
            server,
            SPEND_REFUSED,
            1,
            resource=EventResourceFilter(id_prefix=["prefect-gptimage.run.batch-refused-"]),
        )
        [refusal] = [e for e in events if e.payload["max_cost_usd"] == 0]
        assert refusal.payload["uncached"] == 1 and refusal.payload["estimated_cost_usd"] > 0
        assert related_ids(refusal, "flow-run")
        check_edit(server, edit, edit_log, source)

        # seconds later, still exactly one event of each kind per image and per batch
        assert len(read_events(server, IMAGE_STAGED, resource=in_bucket)) == 10 + 1  # + the edit
        manifest = EventResourceFilter(id=[manifest_uri])
        assert len(read_events(server, BATCH_COMPLETED, resource=manifest)) == 1
        # the 10 images, the manifest; the edit and its manifest (the edit's manifest event may
        # still be on its way to the persister: wait for it, then check nothing more came)
        assert len(wait_events(server, MATERIALIZED, 13, resource=in_bucket)) == 13
    finally:
        stop(serving)
