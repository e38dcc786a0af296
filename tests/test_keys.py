"""The key stays ours: never echoed into messages, never sent to a host a reply merely names.

Faults injected into the bundled emulator: a 401 whose body repeats the Authorization header it
was sent (a careless proxy), and a submit reply whose status/result/cancel URLs name another
host. Nothing in fal_client or httpx is patched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli_process

from prefect_gptimage.errors import PermanentDownloadError, PermanentFalError
from prefect_gptimage.fal.client import FalQueueClient
from prefect_gptimage.fal.media import MediaPolicy, download_image_file
from prefect_gptimage.retry import RetryPolicy
from prefect_gptimage.schemas import GptImageRequest, ImageFile
from prefect_gptimage.testing import FalEmulator, Fault
from prefect_gptimage.testing.s3 import LocalS3Server

KEY = "key-id-1234:very-secret-key-5678"
FAST = RetryPolicy(attempts=2, initial_delay=0.01, max_delay=0.02)


@pytest.mark.parametrize("operation", ["submit", "status"])
def test_an_echoed_key_is_redacted_from_the_error(
    fal_emulator: FalEmulator, unique: str, operation: str
) -> None:
    client = FalQueueClient(KEY, retry=FAST)
    request = GptImageRequest(prompt=f"a key {unique}", quality="low")
    handle = client.submit(request) if operation == "status" else None
    fal_emulator.inject(Fault(operation, "echo_key", count=1))  # type: ignore[arg-type]
    with pytest.raises(PermanentFalError) as info:
        client.status(handle) if handle else client.submit(request)
    text = f"{info.value} {info.value.detail!r}"
    assert "invalid credentials" in text  # fal's (the proxy's) words still reach the user
    for part in (KEY, "key-id-1234", "very-secret-key-5678"):
        assert part not in text


def test_queue_urls_on_another_host_are_never_followed(
    fal_emulator: FalEmulator, unique: str
) -> None:
    client = FalQueueClient(KEY, retry=FAST)
    fal_emulator.inject(Fault("submit", "foreign_urls", count=1))
    statuses = fal_emulator.stats["status"]
    handle, output = client.run(GptImageRequest(prompt=f"a host {unique}", quality="low"))
    assert handle.status_url and "foreign.invalid" in handle.status_url  # what the reply said
    assert output.images  # ...yet status and result went to the configured queue host
    assert fal_emulator.stats["status"] > statuses


def test_media_urls_with_credentials_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PermanentDownloadError, match="credentials"):
        download_image_file(
            ImageFile(url="https://user:pass@v3.fal.media/files/x.png"),
            dest_dir=tmp_path,
            request_id="r1",
            endpoint="fal-ai/gpt-image-1.5",
            index=0,
            expected_format="png",
            policy=MediaPolicy(),
        )


# --- keys everywhere: the CLI with a bucket, every echoing fault, every place a run writes ------

CLI_KEY_ID = "kid-7f3a9c2e"
CLI_KEY_SECRET = "sec-Q8vZ2LmN4pR6tY1w"

#: operation -> the row whose calls of that operation answer with the key echoed back
ECHOES = {
    "submit": "row-submit",
    "status": "row-status",
    "result": "row-result",
    "media": "row-media",
}


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_no_key_anywhere_after_a_cli_run_that_met_echoing_faults(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    unique: str,
    tmp_path: Path,
) -> None:
    """Issue 12 "done": no key value in output, logs, the Prefect database, manifests, galleries
    or S3 objects. The CLI runs as a user runs it (its own Prefect home and temporary API, so
    its ``prefect.db`` can be read), with a fault per operation that echoes the key back."""
    home, out = tmp_path / "prefect-home", tmp_path / "out"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") or k.startswith("PREFECT_GPTIMAGE_")
    }
    env.update(
        {
            "FAL_KEY": f"{CLI_KEY_ID}:{CLI_KEY_SECRET}",
            "PREFECT_HOME": str(home),
            "PREFECT_GPTIMAGE_OUTPUT_DIR": str(out),
            # the temporary server may take long to start on a loaded machine (Prefect: 20 s)
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "240",
        }
    )
    rows = [*ECHOES.values(), "row-fine"]
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"a key {row} {unique}", "quality": "low"}) + "\n" for row in rows
        )
    )
    for operation, row in ECHOES.items():
        fault = Fault(operation, "echo_key", count=None, match=f"{row} {unique}")  # type: ignore[arg-type]
        fal_emulator.inject(fault)

    done = run_cli_process(["batch", str(path), "--bucket", s3_bucket, "--json"], env)

    fired = fal_emulator.stats["faults_by_kind"].get("echo_key", 0)
    assert fired >= len(ECHOES), f"only {fired} echo(es) fired: {done.stderr[-3000:]}"
    assert done.returncode == 1, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(summary["images"]) == 1 and len(summary["failures"]) == len(ECHOES)
    assert "invalid credentials" in done.stdout + done.stderr  # the echo itself got through
    assert "<redacted>" in done.stdout + done.stderr  # ... with the key cut out of it

    places: dict[str, bytes] = {"stdout": done.stdout.encode(), "stderr": done.stderr.encode()}
    for root in (home, out):
        for file in _files_under(root):
            places[str(file)] = file.read_bytes()
    s3 = local_s3.client()
    for obj in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", []):
        got = s3.get_object(Bucket=s3_bucket, Key=obj["Key"])
        places[f"s3://{s3_bucket}/{obj['Key']}"] = (
            got["Body"].read() + repr(got["Metadata"]).encode()
        )
    names = set(places)
    assert any(n.endswith("prefect.db") for n in names), sorted(names)
    assert any(n.endswith("index.html") for n in names), sorted(names)
    assert any(n.endswith(".jsonl") and not n.startswith("s3://") for n in names), sorted(names)
    assert any(n.startswith("s3://") and "/manifests/" in n for n in names), sorted(names)

    leaks = [
        f"{where}: {secret}"
        for where, data in places.items()
        for secret in (f"{CLI_KEY_ID}:{CLI_KEY_SECRET}", CLI_KEY_SECRET)
        if secret.encode() in data
    ]
    assert not leaks, leaks
    print(f"{len(places)} places scanned ({len(_files_under(home))} in the Prefect home), no key")
