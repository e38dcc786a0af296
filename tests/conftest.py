"""Shared fixtures: the plugin (prefect_gptimage.testing.pytest_plugin) provides the fal emulator,
the local S3 server and the Prefect harness; here they are wired together for this suite."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def _prefect(prefect_harness: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every test runs against one real Prefect API for the session."""
    yield prefect_harness


@pytest.fixture
def unique() -> str:
    """A short unique text, to keep prompts (and so cache keys) apart between tests."""
    return uuid.uuid4().hex[:10]
