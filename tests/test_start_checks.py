"""Services unreachable or refusing at start (issue 18, item 4): one line naming the setting,
before anything is paid.

The CLI runs as a user runs it (a subprocess). ``PREFECT_API_URL`` points at a port where
nothing listens, or at a server that is not a Prefect API (the local S3 server); the Redis lock
(``PREFECT_GPTIMAGE_LOCK_URL``) is a real ``redis-server`` with a password set
(``requirepass``), given a wrong password, none, or a database it does not have. Each must end
with a non-zero status and one line naming the setting, no traceback, and fal (the emulator)
must have seen no submit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli_process
from real_services import RedisServer, free_port
from test_signals import cli_env

from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

PASSWORD = "lock-s3cret"


def _prompts(tmp_path: Path, unique: str) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"start check {i} {unique}"}) + "\n" for i in range(3))
    )
    return path


def _one_line_naming(done: Any, setting: str) -> None:
    assert done.returncode != 0, done.stdout[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, done.stderr[-4000:]
    assert setting in lines[0] and "nothing was submitted" in lines[0], lines[0]
    assert PASSWORD not in done.stderr  # the URL's password is never shown


@pytest.mark.timeout(600)
@pytest.mark.parametrize("where", ["nothing listening", "not a Prefect API"])
def test_an_api_that_is_not_there_is_one_line_naming_prefect_api_url(
    where: str,
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    prefect_harness: dict[str, Any],
    unique: str,
    tmp_path: Path,
) -> None:
    env = cli_env(prefect_harness, tmp_path)
    if where == "nothing listening":
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{free_port()}/api"
    else:
        env["PREFECT_API_URL"] = f"{local_s3.endpoint_url.rstrip('/')}/api"
    submits = fal_emulator.stats["submit"]

    args = ["batch", str(_prompts(tmp_path, unique)), "--bucket", s3_bucket, "--json"]
    done = run_cli_process(args, env)

    _one_line_naming(done, "PREFECT_API_URL")
    assert fal_emulator.stats["submit"] == submits


@pytest.fixture
def locked_redis(redis_server: RedisServer) -> RedisServer:
    """The test's ``redis-server``, now asking every client for :data:`PASSWORD`."""
    from redis import Redis

    client = Redis.from_url(redis_server.url)
    client.config_set("requirepass", PASSWORD)
    client.close()
    return redis_server


@pytest.mark.timeout(600)
@pytest.mark.parametrize("given", ["wrong password", "no password", "wrong db"])
def test_a_redis_lock_that_refuses_is_one_line_naming_the_lock_url(
    given: str,
    locked_redis: RedisServer,
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    prefect_harness: dict[str, Any],
    unique: str,
    tmp_path: Path,
) -> None:
    port = locked_redis.port
    url = {
        "wrong password": f"redis://:not-{PASSWORD}@127.0.0.1:{port}/0",
        "no password": f"redis://127.0.0.1:{port}/0",
        "wrong db": f"redis://:{PASSWORD}@127.0.0.1:{port}/999",
    }[given]
    env = {**cli_env(prefect_harness, tmp_path), "PREFECT_GPTIMAGE_LOCK_URL": url}
    submits = fal_emulator.stats["submit"]

    args = ["batch", str(_prompts(tmp_path, unique)), "--bucket", s3_bucket, "--json"]
    done = run_cli_process(args, env)

    _one_line_naming(done, "PREFECT_GPTIMAGE_LOCK_URL")
    assert fal_emulator.stats["submit"] == submits
    assert "refused" in done.stderr


@pytest.mark.timeout(600)
def test_the_right_password_passes_the_check(
    locked_redis: RedisServer,
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    prefect_harness: dict[str, Any],
    unique: str,
    tmp_path: Path,
) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    env = {**cli_env(prefect_harness, tmp_path), "PREFECT_GPTIMAGE_LOCK_URL": url}

    args = ["batch", str(_prompts(tmp_path, unique)), "--bucket", s3_bucket, "--json"]
    done = run_cli_process(args, env)

    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["staged"] == 3
