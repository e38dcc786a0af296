"""pytest plugin: the bundled fal emulator, a local S3 server and a Prefect test harness.

Installed with the package (entry point ``pytest11``), but inert until asked for, in
``pyproject.toml``::

    [tool.pytest.ini_options]
    fal_emulator = true

or with ``pytest --fal-emulator``. Then, before any test module is imported, it starts one HTTPS
emulator for the session and exports ``FAL_QUEUE_RUN_HOST``, ``FAL_RUN_HOST``, ``SSL_CERT_FILE``,
``PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS`` and (if unset) ``FAL_KEY``: fal_client reads its hosts
once, at import, so this must happen first.

Fixtures:

* ``fal_emulator``: the session's :class:`~prefect_gptimage.testing.FalEmulator`, with faults and
  latency reset before each test.
* ``local_s3``: a moto S3 server over HTTP for the session, its ``AWS_*`` variables exported.
* ``s3_bucket``: a fresh bucket name on ``local_s3`` for each test.
* ``prefect_harness``: ``prefect_test_harness()`` for the session, results and cache records in
  a temporary folder.

(The package's own suite also starts Redis, PostgreSQL and ``prefect server``: those launchers
live in its ``tests/``, not in the wheel.)

Example:
    >>> def test_my_flow(fal_emulator, prefect_harness):
    ...     my_flow("a lighthouse")
    ...     assert fal_emulator.stats["submit"] == 1
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prefect_gptimage.testing.emulator import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

_EMULATOR_KEY = pytest.StashKey[FalEmulator]()
DEFAULT_LATENCY = 0.05
#: Seconds the session's Prefect harness may take to answer (a deadline for a server that never
#: starts, not a performance bound).
HARNESS_STARTUP_S = 180


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("prefect-gptimage")
    group.addoption("--fal-emulator", action="store_true", help="start the bundled fal emulator")
    parser.addini(
        "fal_emulator", "start the bundled fal emulator for the session", type="bool", default=False
    )
    parser.addini(
        "fal_emulator_latency",
        "generation latency of the emulator, seconds",
        default=str(DEFAULT_LATENCY),
    )


def pytest_configure(config: pytest.Config) -> None:
    if not (config.getoption("--fal-emulator") or config.getini("fal_emulator")):
        return
    if "fal_client" in sys.modules:
        raise pytest.UsageError(
            "fal_client was imported before the fal emulator started; it reads its hosts at "
            "import time. Import it inside tests or fixtures, not at conftest import."
        )
    emulator = FalEmulator(latency=float(config.getini("fal_emulator_latency"))).start()
    os.environ.update(emulator.env())
    os.environ.setdefault("FAL_KEY", "emulator-key-id:emulator-key-secret")
    config.stash[_EMULATOR_KEY] = emulator


def pytest_unconfigure(config: pytest.Config) -> None:
    emulator = config.stash.get(_EMULATOR_KEY, None)
    if emulator is not None:
        emulator.stop()


@pytest.fixture
def fal_emulator(request: pytest.FixtureRequest) -> Iterator[FalEmulator]:
    """The session's emulator, faults cleared and latency restored for this test."""
    emulator = request.config.stash.get(_EMULATOR_KEY, None)
    if emulator is None:
        pytest.skip("the fal emulator is off: set `fal_emulator = true` or pass --fal-emulator")
    latency = float(request.config.getini("fal_emulator_latency"))
    emulator.clear_faults()
    emulator.set_latency(latency)
    emulator.set_misspell_rate(0.0)
    yield emulator
    emulator.clear_faults()
    emulator.set_latency(latency)
    emulator.set_misspell_rate(0.0)


@pytest.fixture(scope="session")
def local_s3() -> Iterator[LocalS3Server]:
    """A moto S3 server (real S3 protocol over HTTP) with its AWS_* variables exported."""
    server = LocalS3Server()
    server.start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def s3_bucket(local_s3: LocalS3Server) -> str:
    """A new, empty bucket for one test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    local_s3.create_bucket(name)
    return name


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[dict[str, Any]]:
    """A real Prefect API (temporary database) for the session; results in a temp folder."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = Path(tempfile.mkdtemp(prefix="gptimage-prefect-results-"))
    # 30 s (Prefect's default) is too short for a fresh database's migrations on a loaded machine:
    # wait as long as CI allows (a loaded machine has needed over 60 s)
    with (
        prefect_test_harness(server_startup_timeout=HARNESS_STARTUP_S),
        temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}),
    ):
        from prefect.settings import PREFECT_API_URL

        yield {"api_url": PREFECT_API_URL.value(), "storage": storage}
