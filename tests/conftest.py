"""Shared fixtures: the plugin (prefect_gptimage.testing.pytest_plugin) provides the fal emulator,
the local S3 server and the Prefect harness; here they are wired together for this suite, with
the real Redis, PostgreSQL and ``prefect server`` of :mod:`real_services` (this suite's, not the
wheel's)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from real_services import PostgresServer, PrefectServer, RedisServer, missing


def run_cli_process(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``prefect-gptimage ARGS`` as a user runs it: a fresh process, configured only by ``env``
    (fal_client reads its hosts at import, so the CLI never runs inside the test process)."""
    return subprocess.run(
        [sys.executable, "-m", "prefect_gptimage.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def start_cli_process(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """:func:`run_cli_process` without waiting: the running command, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "prefect_gptimage.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="session", autouse=True)
def _short_backoff() -> Iterator[None]:
    """Backoff capped at 1 s instead of 8 (users' default): the faults are the same, the suite
    just waits less between retries. CLI subprocesses inherit it through the environment."""
    os.environ["PREFECT_GPTIMAGE_RETRY_MAX_DELAY"] = "1"
    yield
    os.environ.pop("PREFECT_GPTIMAGE_RETRY_MAX_DELAY", None)


@pytest.fixture(scope="session", autouse=True)
def _patient_temporary_server() -> Iterator[None]:
    """A CLI subprocess that starts Prefect's temporary server waits for it up to 240 s, not
    Prefect's 20 s: under load (two CPU hogs beside the suite) it took longer, and the run then
    ended before submitting anything. Inherited through the environment, as above; a test that
    checks the short timeout sets its own value."""
    key = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    had = key in os.environ
    os.environ.setdefault(key, "240")
    yield
    if not had:
        os.environ.pop(key, None)


@pytest.fixture(scope="session", autouse=True)
def _prefect(prefect_harness: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every test runs against one real Prefect API for the session."""
    yield prefect_harness


@pytest.fixture
def unique() -> str:
    """A short unique text, to keep prompts (and so cache keys) apart between tests."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def prefect_api() -> None:
    """The session's Prefect API (the autouse harness above); named for the tests that need it."""


@pytest.fixture(scope="session")
def s3(local_s3: Any) -> Iterator[Any]:
    """The session's S3 server, with boto3 clients rebuilt for its endpoint."""
    from prefect_gptimage.s3 import reset_s3_clients

    reset_s3_clients()
    yield local_s3
    reset_s3_clients()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real ``redis-server`` for one test (its ``url`` is ``redis://127.0.0.1:PORT/0``)."""
    if missing("redis-server"):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster and database for the session."""
    absent = missing("initdb", "pg_ctl", "createdb")
    if absent:
        pytest.skip(f"no {', '.join(absent)}: apt-get install postgresql")
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def prefect_server(request: pytest.FixtureRequest) -> Iterator[PrefectServer]:
    """``prefect server start`` for the session: on PostgreSQL if installed, else on SQLite
    (its ``backend`` says which)."""
    database = None
    if not missing("initdb", "pg_ctl", "createdb"):
        database = request.getfixturevalue("postgres_server")
    with PrefectServer(database) as server:
        yield server
